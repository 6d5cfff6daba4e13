//! `kiln projections status|rebuild|verify`.

use std::process::ExitCode;
use std::sync::Arc;

use indicatif::{ProgressBar, ProgressStyle};
use kiln_store::projection::{self, Projection, ProjectionRunner, RunnerOptions};
use kiln_store::{EventStore, projections};

use crate::cli::ProjectionsCommand;
use crate::commands::open_store;
use crate::config::Config;

pub async fn run(config: &Config, cmd: ProjectionsCommand) -> anyhow::Result<ExitCode> {
    let store = open_store(config).await?;
    store.migrate().await?;
    let batch = config.projections.batch_size;
    // Rebuilds write scratch tables nobody reads: larger batches than the live runner's are free.
    let rebuild_batch = batch.max(projection::REBUILD_BATCH);
    let selected = |name: Option<String>| -> anyhow::Result<Vec<Arc<dyn Projection>>> {
        Ok(match name {
            Some(n) => vec![projections::by_name(&n)?],
            None => projections::all(),
        })
    };
    let code = match cmd {
        ProjectionsCommand::Status => {
            let runner = ProjectionRunner::new(store.clone(), projections::all(), RunnerOptions::default());
            runner.prepare().await?;
            let head = store.head().await?;
            println!("log head: {head}");
            for p in runner.projections() {
                let at = projection::checkpoint(&store, p.name()).await?.0;
                println!("{:<20} v{:<3} at {:>12}  lag {}", p.name(), p.version(), at, head.0.saturating_sub(at));
            }
            ExitCode::SUCCESS
        }
        ProjectionsCommand::Rebuild { name, all: _ } => {
            for p in selected(name)? {
                let runner = runner_for(&store, &p, batch);
                let bar = progress_bar(p.name());
                let at = projection::rebuild(&runner, p.as_ref(), rebuild_batch, &|done, head| {
                    bar.set_length(head);
                    bar.set_position(done);
                })
                .await?;
                bar.finish_and_clear();
                println!("rebuilt {} up to position {at}", p.name());
            }
            ExitCode::SUCCESS
        }
        ProjectionsCommand::Verify { name } => {
            let mut ok = true;
            for p in selected(name)? {
                let runner = runner_for(&store, &p, batch);
                let report = projection::verify(&runner, p.as_ref(), rebuild_batch).await?;
                if report.ok() {
                    println!("{}: ok ({} rows at position {})", report.projection, report.rows, report.position);
                } else {
                    ok = false;
                    println!("{}: DIFFERS at position {}", report.projection, report.position);
                    for d in &report.differences {
                        println!("  {}", serde_json::to_string(d)?);
                    }
                }
            }
            if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE }
        }
    };
    store.close().await;
    Ok(code)
}

fn runner_for(store: &kiln_store::Store, p: &Arc<dyn Projection>, batch: usize) -> ProjectionRunner {
    ProjectionRunner::new(
        store.clone(),
        vec![p.clone()],
        RunnerOptions { batch_size: batch, ..RunnerOptions::default() },
    )
}

fn progress_bar(name: &str) -> ProgressBar {
    let bar = ProgressBar::new(0);
    if let Ok(style) = ProgressStyle::with_template("{msg:>14} [{bar:40}] {pos}/{len} events ({per_sec}, eta {eta})") {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(name.to_owned());
    bar
}
