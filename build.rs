//! Rebuilds when a migration is added: `sqlx::migrate!` embeds the migration files at compile
//! time, and cargo does not otherwise notice new files in those folders.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
