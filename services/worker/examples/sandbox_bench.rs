//! Measures the Deno sandbox: `cargo run --release -p kiln-worker --example sandbox_bench`.
//! Finds deno like the server does (`KILN_DENO`, then `.kiln/tools/bin/deno`, then `PATH`).

use std::path::{Path, PathBuf};

use kiln_worker::sandbox::DenoBinary;
use kiln_worker::sandbox::bench::{self, BenchOptions};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let explicit = std::env::var_os("KILN_DENO").map(PathBuf::from);
    let deno = DenoBinary::locate(explicit.as_deref(), Some(&root))?;
    let report = bench::run(BenchOptions::new(deno)).await?;
    println!("{report}");
    Ok(())
}
