//! `keyrotd demo`: coming with the operate issue.

/// Runs the showcase. Returns the exit code.
pub async fn run() -> i32 {
    println!("keyrotd demo: coming soon (simulator + file store showcase)");
    0
}
