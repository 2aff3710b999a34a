//! The last bound: ends the process when a retried transaction outlives
//! every limit that should have ended it. A frozen server process (stopped,
//! or stalled on a disk) still has its kernel acknowledge TCP, so no TCP
//! timer fires, and it runs no statement timeout, so libpq would wait on
//! its socket forever; nothing inside the waiting thread can end that wait.
//!
//! The app starts the watchdog once ([`start`]); the code around each
//! retried transaction holds a [`Watch`] for as long as it may legitimately
//! take. Without a started watchdog, watches cost a lock and do nothing.
//! Work with something to say before the run ends (the workload's report
//! so far) registers [`last_words`] for as long as it runs.

use std::sync::{Mutex, OnceLock, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

/// What runs when a watch is overdue: it gets one line saying what hung and
/// for how long, and is expected to end the process.
type OnStall = Box<dyn Fn(String) + Send + Sync>;

/// The slack added to every watch's bound, and what runs on a stall.
static ON_STALL: OnceLock<(Duration, OnStall)> = OnceLock::new();
static WATCHES: Mutex<Vec<(u64, &'static str, Instant, Duration)>> = Mutex::new(Vec::new());
static NEXT_ID: Mutex<u64> = Mutex::new(0);
/// What to print before the stall's line ends the run.
type LastWords = Box<dyn Fn(&str) + Send + Sync>;
static LAST_WORDS: Mutex<Option<LastWords>> = Mutex::new(None);

/// How often the watchdog looks: a watch ends at most this late.
const TICK: Duration = Duration::from_millis(100);

/// The slack by default (`--watchdog-slack`): the time the last answer may
/// take to arrive once every limit of the transaction has passed.
pub const DEFAULT_SLACK: Duration = Duration::from_secs(5);

/// Starts the watchdog thread, once. A watch is overdue `slack` after its
/// own bound; `on_stall` gets the line to print.
pub fn start(slack: Duration, on_stall: impl Fn(String) + Send + Sync + 'static) {
    if ON_STALL.set((slack, Box::new(on_stall))).is_err() {
        return;
    }
    thread::spawn(move || loop {
        thread::sleep(TICK);
        let overdue = WATCHES
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .find(|(_, _, started, bound)| started.elapsed() > *bound + slack)
            .map(|(_, what, _, bound)| (*what, *bound + slack));
        if let (Some((what, bound)), Some((_, on_stall))) = (overdue, ON_STALL.get()) {
            let line = format!(
                "{what}: no answer from the server within {} s, every limit included; \
                 its process may be frozen or its disk stalled, so this run stops here",
                seconds(bound)
            );
            if let Some(last_words) = LAST_WORDS
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .as_ref()
            {
                last_words(&line);
            }
            on_stall(line);
        }
    });
}

/// Whole seconds as `8`, others as `2.5`.
fn seconds(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        d.as_secs().to_string()
    } else {
        format!("{:.1}", d.as_secs_f64())
    }
}

/// Watches one piece of work that should end within `bound` (none: not
/// watched). Dropping it ends the watch.
#[derive(Debug)]
#[must_use = "the watch ends when this is dropped"]
pub struct Watch(Option<u64>);

/// Starts watching `what`.
pub fn watch(what: &'static str, bound: Option<Duration>) -> Watch {
    let Some(bound) = bound else {
        return Watch(None);
    };
    let id = {
        let mut next = NEXT_ID.lock().unwrap_or_else(PoisonError::into_inner);
        *next += 1;
        *next
    };
    WATCHES
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push((id, what, Instant::now(), bound));
    Watch(Some(id))
}

impl Drop for Watch {
    fn drop(&mut self) {
        if let Some(id) = self.0 {
            WATCHES
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .retain(|(other, ..)| *other != id);
        }
    }
}

/// Registers what to print (given the stall's line) when a stall ends the
/// run, until the returned guard is dropped. One at a time: a new one
/// replaces the old.
pub fn last_words(say: impl Fn(&str) + Send + Sync + 'static) -> LastWordsGuard {
    *LAST_WORDS.lock().unwrap_or_else(PoisonError::into_inner) = Some(Box::new(say));
    LastWordsGuard(())
}

/// Unregisters the last words when dropped.
#[derive(Debug)]
#[must_use = "the last words are forgotten when this is dropped"]
pub struct LastWordsGuard(());

impl Drop for LastWordsGuard {
    fn drop(&mut self) {
        *LAST_WORDS.lock().unwrap_or_else(PoisonError::into_inner) = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn with_the_defaults_a_stall_ends_the_run_after_55_seconds() {
        let retrier = crate::retry::Retrier::new(
            crate::retry::RetryPolicy::default(),
            crate::retry::Server::PostgreSql,
        );
        // The deadline (30 s), one statement's wait (20 s), the slack (5 s).
        assert_eq!(
            retrier.worst_case().map(|bound| bound + DEFAULT_SLACK),
            Some(Duration::from_secs(55))
        );
    }

    #[test]
    fn bounds_read_as_whole_or_tenths_of_seconds() {
        assert_eq!(seconds(Duration::from_secs(8)), "8");
        assert_eq!(seconds(Duration::from_millis(2500)), "2.5");
    }
}
