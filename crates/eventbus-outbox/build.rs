//! Rebuilds the crate when a migration is added or changed: `sqlx::migrate!`
//! embeds `migrations/` at compile time, and Cargo does not watch it
//! otherwise (the build script `sqlx migrate build-script` writes).

fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
