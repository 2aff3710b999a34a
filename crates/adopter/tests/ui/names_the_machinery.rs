// The decision table and its inputs are the crate's own: a user cannot
// name them, so they can change without breaking anyone.
use diesel_tx_retry::decide;
use diesel_tx_retry::classify;
use diesel_tx_retry::Situation;

fn main() {}
