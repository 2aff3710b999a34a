//! The workload's report: what the workers counted ([`Tally`]), what the
//! retry helper's observer saw ([`Attempts`]), and the two ways it is
//! printed (`--json`, text).

use std::sync::atomic::Ordering;

use serde::Serialize;

use super::tally::{Attempts, Tally};
use crate::plan::Settings;

/// What happened, in the shape `--json` prints.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    /// Worker threads.
    pub workers: usize,
    /// Accounts transferred between.
    pub accounts: u64,
    /// Transfers that committed.
    pub committed: u64,
    /// Transfers refused for insufficient funds (nothing to retry).
    pub rejected: u64,
    /// Retries across all transfers (as the helper's observer saw them).
    pub retries: u64,
    /// The retries by what caused them.
    pub retries_by_cause: RetriesByCause,
    /// Time spent backing off between attempts, in milliseconds, across all
    /// workers.
    pub backoff_ms: f64,
    /// Transfers that used up a retry budget.
    pub gave_up: u64,
    /// The same by budget: the transfer's attempts, its deadline, or the
    /// process's shared retry budget (`--retry-budget`).
    pub gave_up_by_budget: GaveUpByBudget,
    /// Transfers whose outcome is still unknown at the end (in doubt): 0
    /// unless a budget ran out before a retry could resolve a commit in
    /// doubt, or a stall ended the run while they waited for the server.
    pub in_doubt: u64,
    /// Commits that were in doubt and that a retry resolved.
    pub resolved_in_doubt: Resolved,
    /// Transfers ended by a hard error (the one that stopped the run).
    pub failed: u64,
    /// Transfers whose call was dropped at `--request-timeout` (`--async`),
    /// as a service drops a request past its deadline.
    pub cancelled: u64,
    /// Of those, the ones whose commit was already on its way and went
    /// through (the helper's observer heard it): in the ledger, and not in
    /// `committed`.
    pub cancelled_committed: u64,
    /// Workers that could not get a connection (the server refused it, or
    /// none came within the pool's wait) and stopped.
    pub unconnected_workers: u64,
    /// Seconds the transfers ran.
    pub elapsed_s: f64,
    /// Committed transfers per second.
    pub transfers_per_s: f64,
    /// Latency of committed transfers, retries included.
    pub latency_ms: Latency,
    /// CPU time this process spent while the transfers ran (every thread,
    /// user and system), in milliseconds: the client's cost.
    pub client_cpu_ms: f64,
    /// The same per committed transfer, in microseconds.
    pub client_cpu_us_per_transfer: f64,
    /// The sum of the accounts' balances before the transfers.
    pub total_before: i64,
    /// The sum after them, if it could be read.
    pub total_after: Option<i64>,
    /// Accounts with a negative balance afterwards, if they could be read.
    pub negative_balances: Option<i64>,
    /// The ledger reconciled against the balances, if it could be read.
    pub ledger: Option<Ledger>,
    /// Whether the total is unchanged, nothing is negative, the ledger holds
    /// one row per committed transfer (those cancelled after their commit
    /// went through included) and every balance is its initial one plus the
    /// ledger's movements; `None` when the balances could not be read.
    pub invariant_ok: Option<bool>,
    /// What ended the run early, if anything did.
    pub error: Option<String>,
}

/// Transfers given up, by the budget that ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct GaveUpByBudget {
    /// The transfer's attempts (`--max-retries`).
    pub attempts: u64,
    /// The transfer's deadline (`--tx-deadline`).
    pub deadline: u64,
    /// The process's retry budget (`--retry-budget`).
    pub retry_budget: u64,
}

/// Commits in doubt resolved by a retry, by how.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct Resolved {
    /// The retry found the transfer's ledger row: the earlier attempt had
    /// committed it, and nothing more was applied.
    pub applied_earlier: u64,
    /// The earlier attempt had not committed; the retry applied it.
    pub applied_on_retry: u64,
}

/// The ledger against the balances, after the transfers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Ledger {
    /// The ledger's rows for this run's accounts.
    pub rows: u64,
    /// Accounts whose balance is not their initial one plus the ledger's
    /// movements.
    pub mismatched_accounts: u64,
}

/// Retries by their cause.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct RetriesByCause {
    /// Serialization failures (40001).
    pub conflict: u64,
    /// Connections lost before the commit, retried on a new one.
    pub connection_lost: u64,
    /// Anything else the helper retried (an idempotent commit in doubt).
    pub other: u64,
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Latency {
    /// Median.
    pub p50: f64,
    /// 95th percentile.
    pub p95: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Slowest.
    pub max: f64,
}

impl Report {
    /// The report of `tally`; `balances` is the total and the count of
    /// negative balances afterwards, when they could be read.
    pub(super) fn new(
        settings: &Settings,
        tally: &Tally,
        attempts: &Attempts,
        elapsed: std::time::Duration,
        total_before: i64,
        balances: Option<(i64, i64)>,
        ledger: Option<Ledger>,
    ) -> Self {
        let ms = |quantile: f64| tally.latency_us.value_at_quantile(quantile) as f64 / 1_000.0;
        let elapsed_s = elapsed.as_secs_f64();
        let by_cause = attempts.by_cause();
        Report {
            workers: settings.workers(),
            accounts: settings.accounts() as u64,
            committed: tally.committed,
            rejected: tally.rejected,
            retries: by_cause.conflict + by_cause.connection_lost + by_cause.other,
            retries_by_cause: by_cause,
            backoff_ms: attempts.backoff_us.load(Ordering::Relaxed) as f64 / 1_000.0,
            gave_up: tally.gave_up_by.attempts
                + tally.gave_up_by.deadline
                + tally.gave_up_by.retry_budget,
            gave_up_by_budget: tally.gave_up_by,
            in_doubt: tally.in_doubt,
            resolved_in_doubt: tally.resolved,
            failed: tally.failed,
            cancelled: tally.cancelled,
            cancelled_committed: tally.cancelled_committed,
            unconnected_workers: tally.unconnected,
            elapsed_s,
            transfers_per_s: tally.committed as f64 / elapsed_s.max(f64::EPSILON),
            client_cpu_ms: 0.0,
            client_cpu_us_per_transfer: 0.0,
            latency_ms: Latency {
                p50: ms(0.50),
                p95: ms(0.95),
                p99: ms(0.99),
                max: tally.latency_us.max() as f64 / 1_000.0,
            },
            total_before,
            total_after: balances.map(|(total, _)| total),
            negative_balances: balances.map(|(_, negative)| negative),
            ledger,
            invariant_ok: balances.map(|(total, negative)| {
                total == total_before
                    && negative == 0
                    && ledger.is_some_and(|l| {
                        l.rows == tally.committed + tally.cancelled_committed
                            && l.mismatched_accounts == 0
                    })
            }),
            error: None,
        }
    }

    /// Records the CPU the transfers cost the client.
    pub(super) fn set_client_cpu(&mut self, cpu: std::time::Duration) {
        self.client_cpu_ms = cpu.as_secs_f64() * 1e3;
        self.client_cpu_us_per_transfer = if self.committed == 0 {
            0.0
        } else {
            cpu.as_secs_f64() * 1e6 / self.committed as f64
        };
    }

    /// The report as `--json` or as text.
    pub fn render(&self, json: bool) -> String {
        if json {
            // A struct of numbers, options and strings always serializes.
            serde_json::to_string(self).unwrap_or_else(|err| format!("{{\"error\":\"{err}\"}}"))
        } else {
            self.to_text()
        }
    }

    /// What the run broke, when the balances could be read and the
    /// invariant does not hold: one line for the error.
    pub fn broken_invariant(&self) -> Option<String> {
        let (Some(false), Some(after), Some(negative)) =
            (self.invariant_ok, self.total_after, self.negative_balances)
        else {
            return None;
        };
        let ledger = self.ledger.map_or_else(
            || "the ledger unread".to_owned(),
            |l| {
                format!(
                    "{} ledger rows for {} committed transfers, {} accounts off the ledger",
                    l.rows, self.committed, l.mismatched_accounts
                )
            },
        );
        Some(format!(
            "invariant broken: total balance {} before and {after} after, {negative} negative balances, {ledger}",
            self.total_before
        ))
    }

    /// The report as a few lines of text.
    pub fn to_text(&self) -> String {
        let ledger = match self.ledger {
            Some(l) => format!(
                ", ledger {} rows for {} committed, {} accounts off it",
                l.rows, self.committed, l.mismatched_accounts
            ),
            None => ", ledger unread".to_owned(),
        };
        let invariant = match (self.invariant_ok, self.total_after, self.negative_balances) {
            (Some(ok), Some(after), Some(negative)) => format!(
                "total {} before, {after} after, {negative} negative balances{ledger}: {}",
                self.total_before,
                if ok { "ok" } else { "BROKEN" }
            ),
            _ => "could not be checked (the balances could not be read)".to_owned(),
        };
        let mut text = format!(
            "Ran transfers between {accounts} accounts from {workers} workers for {elapsed:.2} s.\n\
             committed: {committed} ({tps:.1} transfers/s), rejected (insufficient funds): {rejected}\n\
             retries: {retries} ({conflict} conflicts, {lost} lost connections, {other} other; \
             {backoff:.1} ms backing off), gave up: {gave_up} ({by_attempts} attempts, {by_deadline} \
             deadline, {by_budget} retry budget), failed: {failed}\n\
             commits in doubt: {in_doubt} unresolved, {earlier} resolved as applied earlier, \
             {on_retry} as applied on retry\n\
             latency ms: p50 {p50:.3}, p95 {p95:.3}, p99 {p99:.3}, max {max:.3}\n\
             invariant: {invariant}",
            accounts = self.accounts,
            workers = self.workers,
            elapsed = self.elapsed_s,
            committed = self.committed,
            tps = self.transfers_per_s,
            rejected = self.rejected,
            retries = self.retries,
            conflict = self.retries_by_cause.conflict,
            lost = self.retries_by_cause.connection_lost,
            other = self.retries_by_cause.other,
            backoff = self.backoff_ms,
            gave_up = self.gave_up,
            by_attempts = self.gave_up_by_budget.attempts,
            by_deadline = self.gave_up_by_budget.deadline,
            by_budget = self.gave_up_by_budget.retry_budget,
            in_doubt = self.in_doubt,
            earlier = self.resolved_in_doubt.applied_earlier,
            on_retry = self.resolved_in_doubt.applied_on_retry,
            failed = self.failed,
            p50 = self.latency_ms.p50,
            p95 = self.latency_ms.p95,
            p99 = self.latency_ms.p99,
            max = self.latency_ms.max,
        );
        if self.cancelled > 0 {
            text.push_str(&format!(
                "\ncancelled at the request timeout: {} ({} of them committed anyway, in the ledger)",
                self.cancelled, self.cancelled_committed
            ));
        }
        if self.unconnected_workers > 0 {
            text.push_str(&format!(
                "\nworkers that could not connect: {} of {}",
                self.unconnected_workers, self.workers
            ));
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::Length;
    use diesel_tx_retry::Cause;

    #[test]
    fn the_text_report_counts_workers_that_could_not_connect_and_unread_balances() {
        let settings = Settings::new(4, 10, Length::Transfers(5), None).unwrap();
        let mut tally = Tally::new().with_unconnected(1);
        tally.committed = 5;
        let report = Report::new(
            &settings,
            &tally,
            &Attempts::default(),
            std::time::Duration::from_secs(1),
            100,
            None,
            None,
        );
        let text = report.to_text();
        assert!(
            text.ends_with(
                "invariant: could not be checked (the balances could not be read)\n\
                 workers that could not connect: 1 of 4"
            ),
            "{text}"
        );
        assert_eq!(report.invariant_ok, None);
        let report = Report::new(
            &settings,
            &Tally::new(),
            &Attempts::default(),
            std::time::Duration::from_secs(1),
            100,
            Some((100, 0)),
            Some(Ledger {
                rows: 0,
                mismatched_accounts: 0,
            }),
        );
        assert_eq!(report.invariant_ok, Some(true));
        // A committed transfer the ledger lacks breaks the invariant, as
        // does a balance off the ledger.
        let mut one = Tally::new();
        one.committed = 1;
        for ledger in [
            Ledger {
                rows: 0,
                mismatched_accounts: 0,
            },
            Ledger {
                rows: 1,
                mismatched_accounts: 2,
            },
        ] {
            let report = Report::new(
                &settings,
                &one,
                &Attempts::default(),
                std::time::Duration::from_secs(1),
                100,
                Some((100, 0)),
                Some(ledger),
            );
            assert_eq!(report.invariant_ok, Some(false), "{ledger:?}");
            assert!(report.to_text().contains("BROKEN"));
        }
        assert!(!report.to_text().contains("could not connect"));
    }

    #[test]
    fn the_observer_counts_retries_by_cause_and_their_backoff() {
        let attempts = Attempts::default();
        let ms = std::time::Duration::from_millis;
        for (cause, backoff) in [
            (Cause::Conflict, ms(2)),
            (Cause::Conflict, ms(0)),
            (Cause::ConnectionLost, ms(3)),
        ] {
            attempts.retried(Some(cause), backoff);
        }
        assert_eq!(
            attempts.by_cause(),
            RetriesByCause {
                conflict: 2,
                connection_lost: 1,
                other: 0
            }
        );
        let settings = Settings::new(1, 2, Length::Transfers(1), None).unwrap();
        let report = Report::new(&settings, &Tally::new(), &attempts, ms(10), 0, None, None);
        assert_eq!((report.retries, report.backoff_ms), (3, 5.0));
    }
}
