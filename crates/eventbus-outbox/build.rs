//! Rebuilds the crate when a migration is added, removed or renamed:
//! `sqlx::migrate!` embeds `migrations/` at compile time and tracks the
//! files it read, but not the folder, so a new migration was left out of an
//! incremental build (the build script `sqlx migrate build-script` writes).

fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
