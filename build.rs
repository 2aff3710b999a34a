//! Rebuilds the app when a migration changes: `embed_migrations!` reads
//! `migrations/` (SQL and `metadata.toml`) at compile time, which cargo does
//! not track by itself.

fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
