// A report's fields are private (read through methods): new ones can come.
use diesel_tx_retry::Committed;

fn attempts(done: &Committed<()>) -> u32 {
    done.attempts
}

fn main() {}
