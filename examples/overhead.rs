//! The helper's own cost: the bank's transfer run through
//! `Retrier::idempotent_transaction` on one connection, on the app's pool and
//! on a `Held` connection from it, and through Diesel's bare
//! `build_transaction().serializable().run(..)`, on one connection each, one
//! client, alternated in rounds. Prints the client CPU (user + system, of
//! the one thread that runs them all) and the wall time per transaction of
//! each, as medians over the rounds. Used by `bench/run`:
//!
//!     DATABASE_URL=... cargo run --release --example overhead -- ROUNDS TRANSACTIONS [MODE,...]
//!
//! MODE is `bare`, `helper_run_on`, `helper_run_pool`, `helper_run_held` or
//! `helper_run_held_budget` (the last with a retry budget)
//! (all five by default); one mode alone is for counting its instructions
//! under callgrind.
//! The database must hold the app's schema; the example adds 1,000 accounts
//! of its own and removes them again.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use bank::bank::{delete_accounts, insert_accounts, transfer, Amount, BankError};
use bank::db::{self, DbUrl, Manager};
use bank::models::Account;
use diesel::prelude::*;
use diesel_tx_retry::{Held, Keyed, Retrier, RetryBudget, Server};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use uuid::Uuid;

const ACCOUNTS: usize = 1_000;

/// CPU time this thread has used, user and system.
fn thread_cpu() -> Duration {
    cpu_time::ThreadTime::try_now()
        .map(|t| t.as_duration())
        .unwrap_or_default()
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Bare,
    HelperOnConnection,
    HelperOnPool,
    HelperOnHeld,
    HelperOnHeldBudget,
}

impl Mode {
    const ALL: [Mode; 5] = [
        Mode::Bare,
        Mode::HelperOnConnection,
        Mode::HelperOnPool,
        Mode::HelperOnHeld,
        Mode::HelperOnHeldBudget,
    ];
    fn parse(name: &str) -> Result<Mode, String> {
        Mode::ALL
            .into_iter()
            .find(|m| m.name() == name)
            .ok_or_else(|| {
                format!(
                    "unknown mode '{name}'; use bare, helper_run_on, helper_run_pool, helper_run_held or helper_run_held_budget"
                )
            })
    }
    fn name(self) -> &'static str {
        match self {
            Mode::Bare => "bare",
            Mode::HelperOnConnection => "helper_run_on",
            Mode::HelperOnPool => "helper_run_pool",
            Mode::HelperOnHeld => "helper_run_held",
            Mode::HelperOnHeldBudget => "helper_run_held_budget",
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn run() -> Result<(), String> {
    let mut args = std::env::args().skip(1);
    let mut number = |default: usize| -> Result<usize, String> {
        match args.next() {
            None => Ok(default),
            Some(arg) => arg
                .parse()
                .map_err(|_| format!("'{arg}' is not a whole number; pass ROUNDS TRANSACTIONS")),
        }
    };
    let rounds = number(5)?.max(1);
    let per_round = number(5_000)?.max(1);
    let modes: Vec<Mode> = match args.next() {
        None => Mode::ALL.to_vec(),
        Some(list) => list.split(',').map(Mode::parse).collect::<Result<_, _>>()?,
    };
    let raw = std::env::var("DATABASE_URL")
        .map_err(|_| "set DATABASE_URL to a database with the app's schema".to_owned())?;
    let url = DbUrl::parse(&raw)?;
    let mut conn = db::establish(&url).map_err(|err| err.to_string())?;
    let version: String = diesel::select(diesel::dsl::sql::<diesel::sql_types::Text>("version()"))
        .get_result(&mut conn)
        .map_err(|err| err.to_string())?;
    let server = Server::from_version(&version);
    // Two connections: one that `run` checks out on each call, one that the
    // `Held` keeps.
    let pool = db::pool_of(Manager::new(&url), 2, Duration::from_secs(15))
        .map_err(|err| err.to_string())?;
    let held = Held::new(&pool);
    let retrier = Retrier::default().for_server(server);
    // The same with the process's retry budget (`--retry-budget`'s
    // default): its cost on the hot path.
    let budgeted = retrier.clone().with_retry_budget(RetryBudget::new(0.5));

    let mut rng = StdRng::seed_from_u64(17);
    let accounts: Vec<Account> = (0..ACCOUNTS)
        .map(|_| Account {
            id: Uuid::new_v4(),
            balance: 1_000_000_000,
        })
        .collect();
    let ids: Vec<Uuid> = accounts.iter().map(|a| a.id).collect();
    insert_accounts(&mut conn, &accounts, 1_000).map_err(|err| err.to_string())?;

    let mut one = |mode: Mode, rng: &mut StdRng| -> Result<(), String> {
        let from = rng.random_range(0..ids.len());
        let to = (from + rng.random_range(1..ids.len())) % ids.len();
        let (from, to) = (ids[from], ids[to]);
        let amount = Amount::Exactly(rng.random_range(1..=100));
        let key = Uuid::new_v4();
        let unit = |c: &mut PgConnection, attempt: &Keyed<'_, Uuid>| {
            transfer(c, attempt, from, to, amount)
        };
        match mode {
            Mode::Bare => conn
                .build_transaction()
                .serializable()
                .run::<_, BankError, _>(|c| unit(c, &Keyed::new(&key)))
                .map(drop)
                .map_err(|err| err.to_string()),
            Mode::HelperOnConnection => retrier
                .idempotent_transaction(&mut conn, key, |c, attempt| unit(c, attempt))
                .map(drop)
                .map_err(|err| err.to_string()),
            Mode::HelperOnPool => retrier
                .idempotent_transaction(&pool, key, |c, attempt| unit(c, attempt))
                .map(drop)
                .map_err(|err| err.to_string()),
            Mode::HelperOnHeld => retrier
                .idempotent_transaction(&held, key, |c, attempt| unit(c, attempt))
                .map(drop)
                .map_err(|err| err.to_string()),
            Mode::HelperOnHeldBudget => budgeted
                .idempotent_transaction(&held, key, |c, attempt| unit(c, attempt))
                .map(drop)
                .map_err(|err| err.to_string()),
        }
    };

    // A warm-up round of each, so that every statement is prepared on both
    // connections before anything is measured.
    for &mode in &modes {
        for _ in 0..200 {
            one(mode, &mut rng)?;
        }
    }
    let mut cpu = vec![Vec::new(); Mode::ALL.len()];
    let mut wall = vec![Vec::new(); Mode::ALL.len()];
    for round in 0..rounds {
        // Alternate the order too, so that no mode always runs first.
        let mut order = modes.clone();
        order.rotate_left(round % modes.len());
        for mode in order {
            let (c0, w0) = (thread_cpu(), Instant::now());
            for _ in 0..per_round {
                one(mode, &mut rng)?;
            }
            let (c1, w1) = (thread_cpu(), Instant::now());
            let i = Mode::ALL.iter().position(|m| *m == mode).unwrap_or(0);
            cpu[i].push((c1 - c0).as_secs_f64() * 1e6 / per_round as f64);
            wall[i].push((w1 - w0).as_secs_f64() * 1e6 / per_round as f64);
        }
    }
    delete_accounts(&mut conn, &ids, false).map_err(|err| err.to_string())?;
    let bare_cpu = if cpu[0].is_empty() {
        f64::NAN
    } else {
        median(cpu[0].clone())
    };
    for (i, mode) in Mode::ALL.iter().enumerate() {
        if cpu[i].is_empty() {
            continue;
        }
        let (c, w) = (median(cpu[i].clone()), median(wall[i].clone()));
        println!(
            "{} cpu_us={c:.1} wall_us={w:.1} cpu_ratio={:.3} rounds={rounds} per_round={per_round}",
            mode.name(),
            c / bare_cpu
        );
    }
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("overhead: {err}");
            ExitCode::FAILURE
        }
    }
}
