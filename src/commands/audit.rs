//! `kiln audit export`: the audit log to stdout as JSON lines, streamed page by page.

use std::process::ExitCode;

use futures::TryStreamExt;
use kiln_store::queries::{self, audit};
use std::io::Write;

use crate::cli::AuditExportFlags;
use crate::commands::open_store;
use crate::config::Config;

pub async fn export(config: &Config, flags: AuditExportFlags) -> anyhow::Result<ExitCode> {
    let filter = audit::AuditFilter {
        since: flags.since.as_deref().map(queries::parse_time).transpose()?,
        until: flags.until.as_deref().map(queries::parse_time).transpose()?,
        actor: flags.actor,
        tool: flags.tool,
        action: flags.action.as_deref().map(str::parse).transpose()?,
        after: flags.after,
    };
    let store = open_store(config).await?;
    store.migrate().await?;
    queries::catch_up(&store, &["audit"]).await?;
    // Blocking writes are fine here: this command is the process's only task.
    let mut out = std::io::BufWriter::with_capacity(1 << 20, std::io::stdout().lock());
    let mut chunks = std::pin::pin!(audit::export(store.clone(), filter, audit::PAGE));
    let written = async {
        while let Some(chunk) = chunks.try_next().await? {
            out.write_all(chunk.as_bytes())?;
        }
        out.flush()?;
        anyhow::Ok(())
    }
    .await;
    store.close().await;
    match written {
        // A reader that stops early (`| head`) is not an error.
        Err(e) if e.downcast_ref::<std::io::Error>().is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe) => {
            Ok(ExitCode::SUCCESS)
        }
        other => other.map(|()| ExitCode::SUCCESS),
    }
}
