//! `kiln`: the one binary. Parses flags, loads the layered config, sets up logging and runs the
//! chosen command; everything else lives in the service crates and `commands`.

mod bench;
mod cli;
mod commands;
mod config;
mod telemetry;

use std::process::ExitCode;

use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    match cli::run(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
