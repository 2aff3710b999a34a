//! How flag values are read: whole numbers with a clear word for what is
//! not one (clap's own would be Rust's "invalid digit found in string"),
//! and durations written as people write them.

use std::ops::RangeInclusive;
use std::time::Duration;

use clap::error::ErrorKind;

/// clap's own range check for a whole number within `range`, after a
/// check that the text is a whole number that fits: clap's own word for
/// `-5` or `many` would be Rust's "invalid digit found in string". For
/// the flags whose range is the command line's own (the retry helper's
/// settings); the plan's counts use [`whole`], and the plan checks them.
pub(super) fn in_range(range: RangeInclusive<u64>) -> Whole {
    let parser = clap::value_parser!(u64).range(*range.start()..=*range.end());
    Whole {
        range: Some(range),
        parser,
    }
}

/// A whole number, no more: its range is the plan's to check, once
/// (`crate::plan`), and the command line only names the flag.
pub(super) fn whole() -> Whole {
    Whole {
        range: None,
        parser: clap::value_parser!(u64).range(..),
    }
}

/// See [`in_range`] and [`whole`].
#[derive(Clone)]
pub(super) struct Whole {
    range: Option<RangeInclusive<u64>>,
    parser: clap::builder::RangedU64ValueParser<u64>,
}

impl clap::builder::TypedValueParser for Whole {
    type Value = u64;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<u64, clap::Error> {
        let text = value.to_string_lossy();
        let digits = !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit());
        if digits && text.parse::<u64>().is_ok() {
            return self.parser.parse_ref(cmd, arg, value);
        }
        let what = match self.range.as_ref().map(|r| (r.start(), r.end())) {
            Some((start, &u64::MAX)) => format!("must be a whole number of at least {start}"),
            Some((start, end)) => format!("must be a whole number from {start} to {end}"),
            None if digits => format!("must be a whole number below {}", u128::from(u64::MAX) + 1),
            None => "must be a whole number".to_owned(),
        };
        let flag = arg.map_or_else(String::new, |arg| format!(" for '{arg}'"));
        Err(clap::Error::raw(
            ErrorKind::ValueValidation,
            format!("invalid value '{text}'{flag}: {what}\n"),
        )
        .with_cmd(cmd))
    }
}

/// A duration written the way people write one (`500ms`, `30s`, `1m 30s`,
/// parsed by humantime), or a plain number of `unit`s, as before.
fn parse_duration(text: &str, unit: Duration) -> Option<Duration> {
    let text = text.trim();
    match text.parse::<f64>() {
        // try_from: a huge number is out of range, not a panic.
        Ok(n) => Duration::try_from_secs_f64(unit.as_secs_f64() * n).ok(),
        Err(_) => humantime::parse_duration(text).ok(),
    }
}

pub(super) fn parse_millis(text: &str) -> Result<Duration, String> {
    match parse_duration(text, Duration::from_millis(1)) {
        Some(d) if d <= Duration::from_secs(60) => Ok(d),
        _ => Err("must be between 0 and 60000 milliseconds, like 2, 0.5 or 2ms".into()),
    }
}

pub(super) fn parse_request_timeout(text: &str) -> Result<Duration, String> {
    match parse_duration(text, Duration::from_millis(1)) {
        Some(d) if !d.is_zero() && d <= Duration::from_secs(3_600) => Ok(d),
        _ => Err("must be more than 0 and at most 3600000 milliseconds, like 50, 2.5 or 1s".into()),
    }
}

pub(super) fn parse_seconds(text: &str) -> Result<Duration, String> {
    match parse_duration(text, Duration::from_secs(1)) {
        Some(d) if !d.is_zero() && d <= Duration::from_secs(86_400) => Ok(d),
        _ => {
            Err("must be more than 0 and at most 86400 seconds, like 30, 0.5, 30s or 500ms".into())
        }
    }
}
