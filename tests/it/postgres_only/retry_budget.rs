//! The process's retry budget (`--retry-budget`) in the workload: a server
//! that fails every attempt gets its retries capped by the budget, and the
//! report says which budget ended each transfer.

use crate::helpers::*;

/// A workload of 40 transfers on a server that answers every transfer's
/// write with a serialization failure, retried at once.
fn always_conflicting(budget: &str) -> serde_json::Value {
    let db = TestDb::with_faults();
    db.exec(
        "CREATE FUNCTION always_conflict() RETURNS trigger AS $$
         BEGIN PERFORM raise_error('40001'); RETURN NEW; END $$ LANGUAGE plpgsql;
         CREATE TRIGGER always_conflict BEFORE UPDATE ON accounts
         FOR EACH ROW EXECUTE FUNCTION always_conflict()",
    );
    let args = workload_args(
        &db.url_string(),
        &[
            "--retry-budget",
            budget,
            "--backoff-base-ms",
            "0",
            "--backoff-cap-ms",
            "0",
        ],
        2,
        10,
        &["--transfers", "40", "--json"],
    );
    let out = bank(&strs(&args));
    assert_ok(&out);
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn the_retry_budget_caps_retries_against_a_server_that_fails_everything() {
    let off = always_conflicting("off");
    let on = always_conflicting("0");
    eprintln!(
        "off: {}\non: {}",
        off["gave_up_by_budget"], on["gave_up_by_budget"]
    );
    // Without the budget, every transfer retries ten times, then gives up
    // by its attempts.
    assert_eq!(off["gave_up_by_budget"]["attempts"], 40, "{off}");
    assert_eq!(off["retries"], 400, "{off}");
    // With no share for retries, only the floor's 10 a second are paid
    // for: most transfers end refused by the budget, after few retries.
    let refused = on["gave_up_by_budget"]["retry_budget"].as_u64().unwrap();
    assert!(refused > 0, "{on}");
    assert_eq!(on["gave_up"], 40, "{on}");
    assert!(on["retries"].as_u64().unwrap() < 400, "{on}");
    for report in [&off, &on] {
        assert_eq!(report["committed"], 0, "{report}");
        assert_eq!(report["invariant_ok"], true, "{report}");
    }
}
