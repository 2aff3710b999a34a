//! The last bound: ends the process when a retried transaction outlives
//! every limit that should have ended it. A frozen server process (stopped,
//! or stalled on a disk) still has its kernel acknowledge TCP, so no TCP
//! timer fires, and it runs no statement timeout, so libpq would wait on
//! its socket forever; nothing inside the waiting thread can end that wait.
//!
//! `main` starts one [`Watchdog`] and hands it down; the code around each
//! retried transaction holds a [`Watch`] for as long as it may legitimately
//! take. A watchdog that was never started ([`Watchdog::off`], for tests
//! and library callers) watches nothing. Work with something to say before
//! the run ends (the workload's report so far) registers last words for as
//! long as it runs.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::thread;
use std::time::{Duration, Instant};

use diesel_tx_retry::Retrier;

/// The slack by default (`--watchdog-slack`): the time the last answer may
/// take to arrive once every limit of the transaction has passed.
pub const DEFAULT_SLACK: Duration = Duration::from_secs(5);

/// How often the watchdog looks: a watch ends at most this late.
const TICK: Duration = Duration::from_millis(100);

/// What to print, given the stall's line, before that line ends the run.
type LastWords = Box<dyn Fn(&str) + Send + Sync>;

/// The watchdog, cheap to clone: every clone watches with the same thread.
#[derive(Clone, Default)]
pub struct Watchdog(Option<Arc<Shared>>);

impl std::fmt::Debug for Watchdog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Watchdog")
            .field(&self.0.as_ref().map(|shared| shared.slack))
            .finish()
    }
}

struct Shared {
    slack: Duration,
    watches: Mutex<Vec<(u64, &'static str, Instant, Duration)>>,
    next_id: AtomicU64,
    last_words: Mutex<Option<LastWords>>,
}

impl Watchdog {
    /// A watchdog that watches nothing.
    pub fn off() -> Self {
        Self(None)
    }

    /// Starts the watchdog's thread: a watch is overdue `slack` after its
    /// own bound, and then `on_stall` gets the line to print (after the
    /// last words, if any) and is expected to end the process. The thread
    /// ends when the last clone of the watchdog is dropped.
    pub fn start(slack: Duration, on_stall: impl Fn(String) + Send + 'static) -> Self {
        let shared = Arc::new(Shared {
            slack,
            watches: Mutex::new(Vec::new()),
            next_id: AtomicU64::new(0),
            last_words: Mutex::new(None),
        });
        let weak: Weak<Shared> = Arc::downgrade(&shared);
        thread::spawn(move || loop {
            thread::sleep(TICK);
            let Some(shared) = weak.upgrade() else {
                return;
            };
            let overdue = lock(&shared.watches)
                .iter()
                .find(|(_, _, started, bound)| started.elapsed() > *bound + slack)
                .map(|(_, what, _, bound)| (*what, *bound + slack));
            if let Some((what, bound)) = overdue {
                let line = format!(
                    "{what}: no answer from the server within {} s, every limit included; \
                     its process may be frozen or its disk stalled, so this run stops here",
                    seconds(bound)
                );
                if let Some(last_words) = lock(&shared.last_words).as_ref() {
                    last_words(&line);
                }
                on_stall(line);
            }
        });
        Self(Some(shared))
    }

    /// Watches `what`, one call of `retrier`: it should end within the
    /// deadline and one statement's wait after it (not watched without a
    /// deadline). Dropping the watch ends it.
    pub fn watch(&self, what: &'static str, retrier: &Retrier) -> Watch {
        let (Some(shared), Some(bound)) = (&self.0, worst_case(retrier)) else {
            return Watch(None);
        };
        let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
        lock(&shared.watches).push((id, what, Instant::now(), bound));
        Watch(Some((shared.clone(), id)))
    }

    /// Registers what to print (given the stall's line) when a stall ends the
    /// run, until the returned guard is dropped. One at a time: a new one
    /// replaces the old.
    pub fn last_words(&self, say: impl Fn(&str) + Send + Sync + 'static) -> LastWordsGuard {
        if let Some(shared) = &self.0 {
            *lock(&shared.last_words) = Some(Box::new(say));
        }
        LastWordsGuard(self.0.clone())
    }
}

/// The longest one retried transaction may take when the server answers at
/// once: the deadline, then one statement's wait. `None` without a deadline.
pub fn worst_case(retrier: &Retrier) -> Option<Duration> {
    let deadline = retrier.deadline()?;
    Some(deadline + retrier.statement_timeout().unwrap_or(deadline))
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Whole seconds as `8`, others as `2.5`.
fn seconds(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        d.as_secs().to_string()
    } else {
        format!("{:.1}", d.as_secs_f64())
    }
}

/// One piece of work being watched.
#[must_use = "the watch ends when this is dropped"]
pub struct Watch(Option<(Arc<Shared>, u64)>);

impl std::fmt::Debug for Watch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Watch")
            .field(&self.0.as_ref().map(|(_, id)| id))
            .finish()
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        if let Some((shared, id)) = &self.0 {
            lock(&shared.watches).retain(|(other, ..)| other != id);
        }
    }
}

/// Unregisters the last words when dropped.
#[must_use = "the last words are forgotten when this is dropped"]
pub struct LastWordsGuard(Option<Arc<Shared>>);

impl std::fmt::Debug for LastWordsGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LastWordsGuard")
    }
}

impl Drop for LastWordsGuard {
    fn drop(&mut self) {
        if let Some(shared) = &self.0 {
            *lock(&shared.last_words) = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn with_the_defaults_a_stall_ends_the_run_after_55_seconds() {
        // The deadline (30 s), one statement's wait (20 s), the slack (5 s).
        assert_eq!(
            worst_case(&Retrier::default()).map(|bound| bound + DEFAULT_SLACK),
            Some(Duration::from_secs(55))
        );
    }

    #[test]
    fn bounds_read_as_whole_or_tenths_of_seconds() {
        assert_eq!(seconds(Duration::from_secs(8)), "8");
        assert_eq!(seconds(Duration::from_millis(2500)), "2.5");
    }

    #[test]
    fn an_overdue_watch_calls_the_last_words_then_the_stall() {
        let (said, said_rx) = std::sync::mpsc::channel();
        let (stalled, stalled_rx) = std::sync::mpsc::channel();
        let watchdog = Watchdog::start(Duration::from_millis(50), move |line| {
            let _ = stalled.send(line);
        });
        let _words = watchdog.last_words(move |line| {
            let _ = said.send(line.to_owned());
        });
        let retrier = Retrier::default()
            .with_deadline(Duration::from_millis(50))
            .with_statement_timeout(Duration::from_millis(50));
        let _watch = watchdog.watch("testing", &retrier);
        let line = stalled_rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert!(
            line.starts_with("testing: no answer from the server within "),
            "{line}"
        );
        assert_eq!(said_rx.recv_timeout(Duration::from_secs(1)).unwrap(), line);
    }
}
