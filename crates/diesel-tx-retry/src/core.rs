//! The retry loop's bookkeeping as a state machine that never touches a
//! connection: attempts, budgets, the deadline, commits in doubt, the next
//! step, the backoff. A front end (`blocking.rs`, `nonblocking.rs`) tells it
//! what happened to the last thing it did ([`Core::began`], [`Core::ran`],
//! [`Core::failed`], ...) and asks what to do next ([`Core::next`]); the
//! decision itself is [`decide`], one pure function.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

use tracing::{debug, debug_span, Span};

use crate::decide::{commit_in_doubt, decide, framing, Class, Situation, Stage, Step};
use crate::{
    Attempt, Budget, Cause, Committed, Isolation, Outcome, Protocol, Resolution, Retrier, Server,
    TxError,
};

/// What stays fixed for one call.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Plan {
    pub(crate) server: Server,
    pub(crate) protocol: Protocol,
    pub(crate) isolation: Isolation,
    pub(crate) read_only: bool,
    /// Whether the unit says how a commit in doubt ended ([`Verdict`]), and
    /// so may be retried after one.
    pub(crate) idempotent: bool,
    /// Whether another connection can be had (a pool, not the caller's own).
    pub(crate) replaceable: bool,
}

impl Plan {
    /// The protocol that frames this call's transactions.
    pub(crate) fn framing(&self) -> Protocol {
        framing(self.protocol, self.isolation)
    }
}

/// What an attempt's unit said of the change it makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// A plain unit: it says nothing.
    Plain,
    /// It applied the change now.
    AppliedNow,
    /// It found the change applied earlier.
    AppliedEarlier,
}

/// What the front end does next.
#[derive(Debug)]
pub(crate) enum Do<'r, V, E> {
    /// Make sure a transaction is open: on the connection there is, or a
    /// new one, `BEGIN` with this message unless a rewound transaction is
    /// still open.
    Begin(Cow<'r, str>),
    /// Run the unit.
    Run {
        /// 1 for the first attempt.
        attempt: u32,
        /// Whether an earlier attempt's commit is in doubt.
        in_doubt: bool,
    },
    /// Send the commit message.
    Commit(Cow<'r, str>),
    /// Send this rewind message (`ROLLBACK TO SAVEPOINT ...`); on failure,
    /// roll back.
    Rewind(String),
    /// Roll back what is open; discard the connection if it cannot.
    Rollback,
    /// Give up on the connection: it is never lent again.
    Discard,
    /// Wait before the next attempt.
    Wait(Duration),
    /// The call is over.
    Return(Result<Committed<V>, TxError<E>>),
}

/// One call's state.
pub(crate) struct Core<'r, V, E> {
    retrier: &'r Retrier,
    plan: Plan,
    start: Instant,
    attempts: u32,
    todo: VecDeque<Do<'r, V, E>>,
    /// The unit's value, from its return until the commit answers.
    value: Option<V>,
    /// The cause of a commit in doubt that no unit has resolved yet.
    doubt: Option<E>,
    /// Whether any commit of the call was in doubt.
    doubted: bool,
    /// Whether a unit said its earlier attempt had applied it.
    applied_earlier: bool,
    span: Span,
    attempt_span: Span,
    /// Whether the observer heard how the call ended (or will, from the
    /// task a commit was handed to): if not when the core is dropped, the
    /// caller dropped the call.
    told_end: bool,
}

impl<V, E> Drop for Core<'_, V, E> {
    fn drop(&mut self) {
        if !self.told_end {
            debug!(
                attempts = self.attempts,
                "the call was cancelled by its caller"
            );
            self.tell(None, Outcome::Cancelled, Duration::ZERO, None, None);
            crate::metrics::operation(self.plan.server, "cancelled", self.elapsed(), self.attempts);
        }
    }
}

impl<'r, V, E> Core<'r, V, E> {
    pub(crate) fn new(retrier: &'r Retrier, plan: Plan) -> Self {
        let span = debug_span!("tx", server = ?plan.server, protocol = ?plan.framing(),
            isolation = plan.isolation.sql(), attempts = tracing::field::Empty);
        let start = retrier.clock().now();
        if let Some(shared) = retrier.retry_budget() {
            shared.deposit();
        }
        let mut core = Self {
            retrier,
            plan,
            start,
            attempts: 0,
            todo: VecDeque::with_capacity(3),
            value: None,
            doubt: None,
            doubted: false,
            applied_earlier: false,
            span,
            attempt_span: Span::none(),
            told_end: false,
        };
        core.begin();
        core
    }

    /// The span of the whole call.
    pub(crate) fn span(&self) -> &Span {
        &self.span
    }

    /// The span of the current attempt, a child of [`Core::span`].
    pub(crate) fn attempt_span(&self) -> &Span {
        &self.attempt_span
    }

    pub(crate) fn plan(&self) -> &Plan {
        &self.plan
    }

    /// What to do next. Never called again after [`Do::Return`].
    pub(crate) fn next(&mut self) -> Do<'r, V, E> {
        // Each event queues what follows it; an empty queue would be a
        // front end that skipped an event.
        self.todo
            .pop_front()
            .unwrap_or_else(|| unreachable!("the front end skipped an event"))
    }

    /// A new attempt: begin, with the statement bound for the time left.
    fn begin(&mut self) {
        self.attempts += 1;
        self.attempt_span = debug_span!(parent: &self.span, "tx_attempt", attempt = self.attempts,
            retry_cause = tracing::field::Empty);
        let sql = self.retrier.begin_sql(&self.plan, self.start);
        self.todo.push_back(Do::Begin(sql));
    }

    /// The transaction is open: run the unit.
    pub(crate) fn began(&mut self) {
        self.todo.push_back(Do::Run {
            attempt: self.attempts,
            in_doubt: self.doubt.is_some(),
        });
    }

    /// The unit returned `value`, saying `verdict` of its change: commit.
    pub(crate) fn ran(&mut self, value: V, verdict: Verdict) {
        match verdict {
            Verdict::AppliedEarlier => {
                self.applied_earlier = true;
                self.doubt = None;
            }
            Verdict::AppliedNow => self.doubt = None,
            Verdict::Plain => {}
        }
        self.value = Some(value);
        let sql = self.retrier.commit_sql(&self.plan, self.start);
        self.todo.push_back(Do::Commit(sql));
    }

    /// The unit found its key absent, and no earlier attempt can commit it
    /// any more: the doubt is over, and what fails next is definite.
    pub(crate) fn settled(&mut self) {
        self.doubt = None;
    }

    /// The commit succeeded: the call returns the unit's value.
    pub(crate) fn committed(&mut self) {
        let resolution = self.resolution();
        self.tell(None, Outcome::Committed, Duration::ZERO, None, resolution);
        let value = self
            .value
            .take()
            .unwrap_or_else(|| unreachable!("a commit follows a unit's value"));
        self.finish(Ok(Committed::new(value, self.attempts, resolution)));
    }

    /// The commit goes to a task that outlives the caller (the async front
    /// end): what the task needs to tell the observer how it ended, should
    /// the caller be gone by then. Until [`Core::took_back`], the core
    /// does not report the call cancelled.
    #[cfg(feature = "async")]
    pub(crate) fn hand_off_commit(&mut self) -> Handoff {
        self.told_end = true;
        Handoff {
            observer: self.retrier.observer_arc(),
            clock: self.retrier.clock_arc(),
            start: self.start,
            number: self.attempts,
            resolution: self.resolution(),
        }
    }

    /// The commit's task answered the caller, who reports from here on.
    #[cfg(feature = "async")]
    pub(crate) fn took_back(&mut self) {
        self.told_end = false;
    }

    /// No connection could be had for an attempt.
    pub(crate) fn no_connection(&mut self, err: Box<dyn std::error::Error + Send + Sync>) {
        // Only a connection can settle a commit in doubt, and an outage
        // that cut a COMMIT often outlasts one pool checkout: while a doubt
        // is pending, a failed checkout is retried as a lost connection is,
        // within the attempts and the deadline (never the shared budget,
        // which does not end a doubt). Without a doubt nothing committed,
        // and the pool's own wait was the bound.
        if self.doubt.is_some() {
            let backoff = self.retrier.backoff_for(self.attempts);
            if self.spent(self.elapsed() + backoff).is_none() {
                debug!(
                    attempts = self.attempts,
                    error = %err,
                    "no connection while a commit is in doubt; trying again"
                );
                let cause = Some(Cause::ConnectionLost);
                self.tell(cause, Outcome::Reconnected, backoff, None, None);
                crate::metrics::retry(Cause::ConnectionLost);
                if !backoff.is_zero() {
                    self.todo.push_back(Do::Wait(backoff));
                }
                self.begin();
                return;
            }
        }
        self.tell(None, Outcome::NoConnection, Duration::ZERO, None, None);
        // The earlier attempt may have committed: never "nothing committed".
        let result = match self.doubt.take() {
            Some(cause) => TxError::AmbiguousCommit {
                attempts: self.attempts,
                cause,
            },
            None => TxError::NoConnection(err),
        };
        self.finish(Err(result));
    }

    /// The unit panicked; the front end rolls back, then resumes the panic.
    pub(crate) fn panicked(&mut self) {
        self.tell(None, Outcome::Panicked, Duration::ZERO, None, None);
        self.told_end = true;
    }

    /// The unit's error carries a database error its type hides: nothing
    /// can be decided on it.
    pub(crate) fn hidden(&mut self, err: E) {
        self.tell(None, Outcome::Failed, Duration::ZERO, None, None);
        let result = match self.doubt.take() {
            Some(_) => TxError::AmbiguousCommit {
                attempts: self.attempts,
                cause: err,
            },
            None => TxError::HiddenDatabaseError(err),
        };
        self.finish(Err(result));
    }

    /// What was done at `stage` failed with `err`, which means `class`:
    /// the decision table says what follows.
    /// The attempt failed at `stage` with `err`, of `class`; `said` is the
    /// database error's message, for the log.
    pub(crate) fn failed(&mut self, stage: Stage, class: Class, err: E, said: Option<String>) {
        let backoff = self.retrier.backoff_for(self.attempts);
        let situation = Situation {
            stage,
            class,
            server: self.plan.server,
            protocol: self.plan.protocol,
            isolation: self.plan.isolation,
            idempotent: self.plan.idempotent,
            in_doubt: self.doubt.is_some(),
            waits: !backoff.is_zero(),
            replaceable: self.plan.replaceable,
        };
        let step = decide(&situation);
        let cause = Some(Cause::of(class));
        self.attempt_span
            .record("retry_cause", tracing::field::display(Cause::of(class)));
        let value = self.value.take();
        let outcome = match step {
            Step::Committed => {
                if let Some(value) = value {
                    let resolution = self.resolution();
                    self.tell(cause, Outcome::Committed, Duration::ZERO, None, resolution);
                    return self.finish(Ok(Committed::new(value, self.attempts, resolution)));
                }
                // Only a COMMIT, which only a finished unit reaches, can
                // have committed; without a value, fail safe.
                return self.fail(cause, err);
            }
            Step::Ambiguous => {
                debug!(attempts = self.attempts, ?stage, "commit outcome unknown");
                self.tell(cause, Outcome::Ambiguous, Duration::ZERO, None, None);
                return self.finish(Err(TxError::AmbiguousCommit {
                    attempts: self.attempts,
                    cause: err,
                }));
            }
            Step::Fail if class == Class::Aborted && value.is_some() => {
                self.tell(cause, Outcome::Swallowed, Duration::ZERO, None, None);
                return self.finish(Err(TxError::SwallowedError {
                    attempts: self.attempts,
                }));
            }
            Step::Fail => return self.fail(cause, err),
            Step::Rewind => Outcome::Rewound,
            Step::Restart => Outcome::Restarted,
            Step::Reconnect => Outcome::Reconnected,
        };
        let elapsed = self.elapsed();
        let in_doubt_now = commit_in_doubt(&situation);
        // The shared budget pays for retries, but never decides a doubt:
        // a call whose commit is in doubt goes on to resolve it.
        let doubted = self.doubt.is_some() || in_doubt_now;
        let cost = if step == Step::Reconnect {
            crate::RetryBudget::RECONNECT_COST
        } else {
            1.0
        };
        let spent = self.spent(elapsed + backoff).or_else(|| {
            let refused = !doubted
                && self
                    .retrier
                    .retry_budget()
                    .is_some_and(|shared| !shared.withdraw(cost));
            refused.then_some(Budget::Retries)
        });
        if let Some(budget) = spent {
            debug!(attempts = self.attempts, ?budget, "giving up");
            self.tell(cause, Outcome::GaveUp, Duration::ZERO, Some(budget), None);
            // The earlier attempt (or this one) may have committed: never
            // "gave up, nothing committed".
            let result = if self.doubt.is_some() || in_doubt_now {
                TxError::AmbiguousCommit {
                    attempts: self.attempts,
                    cause: err,
                }
            } else {
                TxError::GaveUp {
                    attempts: self.attempts,
                    elapsed,
                    budget,
                    last: err,
                }
            };
            return self.finish(Err(result));
        }
        debug!(
            ?stage,
            ?step,
            sleep_ms = backoff.as_secs_f64() * 1e3,
            in_doubt = in_doubt_now,
            error = said.as_deref().unwrap_or("none"),
            "retrying transaction"
        );
        self.tell(cause, outcome, backoff, None, None);
        crate::metrics::retry(Cause::of(class));
        if in_doubt_now {
            self.doubt = Some(err);
            self.doubted = true;
        }
        match step {
            Step::Rewind => {
                let sql = self.retrier.rewind_sql(self.start);
                self.todo.push_back(Do::Rewind(sql));
            }
            Step::Reconnect => self.todo.push_back(Do::Discard),
            _ => self.todo.push_back(Do::Rollback),
        }
        // Never with a transaction open: a rewind does not wait, and the
        // other steps closed it just above.
        if !backoff.is_zero() {
            self.todo.push_back(Do::Wait(backoff));
        }
        self.begin();
    }

    fn fail(&mut self, cause: Option<Cause>, err: E) {
        self.tell(cause, Outcome::Failed, Duration::ZERO, None, None);
        self.finish(Err(TxError::Failed(err)));
    }

    fn finish(&mut self, result: Result<Committed<V>, TxError<E>>) {
        self.told_end = true;
        self.span.record("attempts", self.attempts);
        let outcome = match &result {
            Ok(done) => {
                if let Some(resolution) = done.doubt() {
                    crate::metrics::in_doubt(resolution.label());
                }
                "committed"
            }
            Err(TxError::GaveUp { budget, .. }) => {
                crate::metrics::gave_up(*budget);
                "gave_up"
            }
            Err(TxError::AmbiguousCommit { .. }) => {
                if self.doubted {
                    crate::metrics::in_doubt("unresolved");
                }
                "ambiguous"
            }
            Err(TxError::SwallowedError { .. }) => "swallowed",
            Err(TxError::NoConnection(_)) => "no_connection",
            Err(_) => "failed",
        };
        crate::metrics::operation(self.plan.server, outcome, self.elapsed(), self.attempts);
        if let Ok(done) = &result {
            if let Some(resolution) = done.doubt() {
                debug!(
                    ?resolution,
                    attempts = self.attempts,
                    "the commit in doubt was resolved"
                );
            }
        }
        self.todo.clear();
        self.todo.push_back(Do::Return(result));
    }

    /// How the call's commits in doubt ended, when it commits.
    fn resolution(&self) -> Option<Resolution> {
        self.doubted.then_some(if self.applied_earlier {
            Resolution::AppliedEarlier
        } else {
            Resolution::AppliedNow
        })
    }

    fn elapsed(&self) -> Duration {
        self.retrier
            .clock()
            .now()
            .saturating_duration_since(self.start)
    }

    /// The budget that forbids a retry that would begin `at` after the
    /// first attempt began.
    fn spent(&self, at: Duration) -> Option<Budget> {
        if self.attempts >= self.retrier.max_attempts() {
            Some(Budget::Attempts)
        } else if self
            .retrier
            .deadline()
            .is_some_and(|deadline| at >= deadline)
        {
            Some(Budget::Deadline)
        } else {
            None
        }
    }

    fn tell(
        &self,
        cause: Option<Cause>,
        outcome: Outcome,
        backoff: Duration,
        budget: Option<Budget>,
        resolution: Option<Resolution>,
    ) {
        if let Some(observer) = self.retrier.observer() {
            observer.attempt(&Attempt {
                number: self.attempts,
                elapsed: self.elapsed(),
                cause,
                outcome,
                backoff,
                budget,
                resolution,
            });
        }
    }
}

/// What a commit's task tells the observer when the call that handed it
/// the commit is gone: the commit's real outcome.
#[cfg(feature = "async")]
pub(crate) struct Handoff {
    observer: Option<std::sync::Arc<dyn crate::Observer>>,
    clock: std::sync::Arc<dyn crate::clock::Clock>,
    start: Instant,
    number: u32,
    resolution: Option<Resolution>,
}

#[cfg(feature = "async")]
impl Handoff {
    /// Tells how the commit of a cancelled call ended: committed; or, where
    /// the commit was sent and no verdict came back, ambiguous; or, as the
    /// caller is gone and nobody retries, cancelled with the error's cause.
    pub(crate) fn tell(&self, result: &Result<(), diesel::result::Error>) {
        let Some(observer) = &self.observer else {
            return;
        };
        let (cause, outcome, resolution) = match result {
            Ok(()) => (None, Outcome::Committed, self.resolution),
            Err(err) => {
                let class = crate::decide::classify(err);
                let outcome = match class {
                    Class::ConnectionLost | Class::Other | Class::StaleStatement => {
                        Outcome::Ambiguous
                    }
                    _ => Outcome::Cancelled,
                };
                (Some(Cause::of(class)), outcome, None)
            }
        };
        debug!(%outcome, "the commit of a cancelled call answered");
        observer.attempt(&Attempt {
            number: self.number,
            elapsed: self.clock.now().saturating_duration_since(self.start),
            cause,
            outcome,
            backoff: Duration::ZERO,
            budget: None,
            resolution,
        });
    }
}

/// The class of `err`, a unit's error or one of the helper's own
/// statements: `None` when its type hides the database error it carries.
pub(crate) fn classify<E: crate::UnitError<M>, M>(err: &E) -> Option<Class> {
    match crate::error::find(err) {
        crate::error::Found::Database(err) => Some(crate::decide::classify(err)),
        crate::error::Found::Domain => Some(Class::Domain),
        crate::error::Found::Hidden => None,
    }
}
