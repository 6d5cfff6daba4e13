//! `kiln runs list|show|replay`: run history from the runs read model and the log, and replays
//! of past runs with a structured diff of their outcomes.

use std::process::ExitCode;
use std::str::FromStr;
use std::sync::Arc;

use anyhow::Context;
use kiln_proto::{Actor, RunId, ToolName};
use kiln_store::Store;
use kiln_store::queries;
use kiln_store::queries::runs::{self, RunDetail, RunFilter, RunSummary, TimelineEntry};
use kiln_worker::DenoSandbox;
use kiln_worker::replay::{self, Change, ReplayOptions, ReplayReport, ReplayVersion};
use kiln_worker::runs::RunEngine;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::cli::{Executor, RunsCommand, RunsListFlags, RunsReplayFlags};
use crate::commands::open_store;
use crate::config::Config;

pub async fn run(config: &Config, cmd: RunsCommand) -> anyhow::Result<ExitCode> {
    let store = open_store(config).await?;
    store.migrate().await?;
    let result = match cmd {
        RunsCommand::List(flags) => list(&store, flags).await,
        RunsCommand::Show { id, json } => show(&store, &id, json).await,
        RunsCommand::Replay(flags) => replay_runs(config, &store, flags).await,
    };
    store.close().await;
    result
}

fn run_id(s: &str) -> anyhow::Result<RunId> {
    RunId::from_str(s).map_err(|_| anyhow::anyhow!("invalid run id {s:?}: expected a UUID as `kiln runs list` shows"))
}

fn filter(
    tool: Option<&str>,
    status: Option<&str>,
    since: Option<&str>,
    until: Option<&str>,
) -> anyhow::Result<RunFilter> {
    Ok(RunFilter {
        tool: tool.map(ToolName::parse).transpose()?,
        status: status.map(str::parse).transpose()?,
        since: since.map(queries::parse_time).transpose()?,
        until: until.map(queries::parse_time).transpose()?,
        ..RunFilter::default()
    })
}

async fn list(store: &Store, flags: RunsListFlags) -> anyhow::Result<ExitCode> {
    let mut f = filter(flags.tool.as_deref(), flags.status.as_deref(), flags.since.as_deref(), flags.until.as_deref())?;
    f.actor = flags.actor;
    queries::catch_up(store, &["runs"]).await?;
    let page = runs::list(store, &f, flags.cursor.as_deref(), flags.limit).await?;
    if flags.json {
        println!("{}", serde_json::to_string_pretty(&page)?);
        return Ok(ExitCode::SUCCESS);
    }
    if page.runs.is_empty() {
        println!("no runs");
    } else {
        println!(
            "{:<36}  {:<24} {:<15} {:>8}  {:<16} {:<27} {:>11}",
            "RUN", "TOOL", "STATUS", "ATTEMPTS", "ACTOR", "REQUESTED", "DURATION"
        );
    }
    for r in &page.runs {
        println!(
            "{:<36}  {:<24} {:<15} {:>8}  {:<16} {:<27} {:>11}",
            r.run_id,
            format!("{}@{}", r.tool, r.tool_version),
            r.status,
            r.attempts,
            r.actor,
            r.requested_at,
            r.duration_ms.map_or("-".to_owned(), |d| format!("{d:.1} ms"))
        );
    }
    if let Some(c) = page.next_cursor {
        println!("more: --cursor {c}");
    }
    Ok(ExitCode::SUCCESS)
}

async fn show(store: &Store, id: &str, json: bool) -> anyhow::Result<ExitCode> {
    let id = run_id(id)?;
    queries::catch_up(store, &["runs"]).await?;
    let detail = runs::get(store, id).await?.with_context(|| format!("no run {id}"))?;
    let timeline = runs::timeline(store, id).await?;
    if json {
        let mut v = serde_json::to_value(&detail)?;
        v["timeline"] = serde_json::to_value(&timeline)?;
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    print!("{}", render_detail(&detail));
    println!("timeline:");
    for e in &timeline {
        print!("{}", render_event(e));
    }
    Ok(ExitCode::SUCCESS)
}

fn compact(v: &Value) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

fn render_detail(d: &RunDetail) -> String {
    let s = &d.summary;
    let mut out = format!("run {}\n", s.run_id);
    out += &format!("  tool       {} version {}\n", s.tool, s.tool_version);
    out += &format!("  status     {} after {} attempt(s)\n", s.status, s.attempts);
    out += &format!("  actor      {}\n", s.actor);
    out += &format!("  requested  {}\n", s.requested_at);
    if let Some(t) = &s.finished_at {
        let took = s.duration_ms.map_or(String::new(), |d| format!(" ({d:.1} ms)"));
        out += &format!("  finished   {t}{took}\n");
    }
    if let Some(t) = &s.next_attempt_at {
        out += &format!("  next try   {t}\n");
    }
    for (label, link) in [("parent", &s.parent_run), ("replay of", &s.replay_of)] {
        if let Some(l) = link {
            out += &format!("  {label:<10} {l}\n");
        }
    }
    out += &format!("  arguments  {}\n", compact(&d.arguments));
    if let Some(o) = &s.output {
        out += &format!("  output     {}\n", compact(o));
    }
    if let Some(e) = &s.error {
        out +=
            &format!("  error      {}: {}\n", e["kind"].as_str().unwrap_or("?"), e["message"].as_str().unwrap_or(""));
    }
    let runs_line = |r: &RunSummary| format!("    {} {}@{} {}\n", r.run_id, r.tool, r.tool_version, r.status);
    if !d.children.is_empty() {
        out += "  children:\n";
        d.children.iter().for_each(|r| out += &runs_line(r));
    }
    if !d.replays.is_empty() {
        out += "  replays:\n";
        d.replays.iter().for_each(|r| out += &runs_line(r));
    }
    out
}

/// One event of the timeline as text, by its type name (types this binary does not know are
/// printed with their payload).
fn render_event(e: &TimelineEntry) -> String {
    let p = &e.payload;
    let s = |k: &str| p[k].as_str().unwrap_or("").to_owned();
    let n = |k: &str| p[k].as_u64().unwrap_or(0);
    let head = format!("  #{:<4} {}  ", e.stream_version, e.at);
    let indent = |text: &str| text.lines().map(|l| format!("           {l}\n")).collect::<String>();
    match e.event_type.as_str() {
        "run.requested" => {
            let mut line = format!("{head}requested {} version {} by {}", s("tool"), n("toolVersion"), e.actor);
            for (k, label) in
                [("parentRun", "child of"), ("replayOf", "replay of"), ("reuseStepsFrom", "reusing steps of")]
            {
                if let Some(v) = p[k].as_str() {
                    line += &format!(", {label} {v}");
                }
            }
            line + "\n"
        }
        "run.attempt_started" => format!(
            "{head}attempt {} started on {} (lease until {})\n",
            n("attempt"),
            s("workerId"),
            s("leaseExpiresAt")
        ),
        "run.step_completed" => {
            let child = p["result"]["runId"].as_str().filter(|_| s("key").starts_with("tools.call#"));
            match child {
                Some(c) => format!(
                    "{head}attempt {} step {:?}: child run {c} ({})\n",
                    n("attempt"),
                    s("key"),
                    p["result"]["tool"].as_str().unwrap_or("?")
                ),
                None => {
                    format!("{head}attempt {} step {:?} recorded {}\n", n("attempt"), s("key"), compact(&p["result"]))
                }
            }
        }
        "run.logs" => {
            let mut out = format!("{head}attempt {} logged:\n", n("attempt"));
            for entry in p["entries"].as_array().into_iter().flatten() {
                let level = entry["level"].as_str().unwrap_or("info");
                out += &indent(&format!("[{level}] {}", entry["message"].as_str().unwrap_or("")));
            }
            if p["truncated"].as_bool() == Some(true) {
                out += &indent("(more lines were dropped: the attempt exceeded its log budget)");
            }
            out
        }
        "run.attempt_failed" => {
            let err = &p["error"];
            let mut out = format!(
                "{head}attempt {} failed: {}: {}\n",
                n("attempt"),
                err["kind"].as_str().unwrap_or("?"),
                err["message"].as_str().unwrap_or("")
            );
            if let Some(stack) = err["stack"].as_str() {
                out += &indent(stack);
            }
            out += &match p["retry"]["decision"].as_str() {
                Some("retry") => indent(&format!(
                    "retry in {} ms, at {}",
                    p["retry"]["delayMs"].as_u64().unwrap_or(0),
                    p["retry"]["nextAttemptAt"].as_str().unwrap_or("?")
                )),
                _ => indent(&format!("no retry: {}", p["retry"]["reason"].as_str().unwrap_or(""))),
            };
            out
        }
        "run.succeeded" => format!("{head}succeeded on attempt {}: {}\n", n("attempt"), compact(&p["output"])),
        "run.failed" => format!(
            "{head}failed after {} attempt(s): {}: {}\n",
            n("attempts"),
            p["error"]["kind"].as_str().unwrap_or("?"),
            p["error"]["message"].as_str().unwrap_or("")
        ),
        "run.cancelled" => {
            let by = p["cancelledBy"].as_str().unwrap_or(&e.actor).to_owned();
            format!("{head}cancelled by {by}{}\n", p["reason"].as_str().map(|r| format!(": {r}")).unwrap_or_default())
        }
        "run.timed_out" => {
            format!("{head}timed out after {} attempt(s) ({} ms each)\n", n("attempts"), n("timeoutMs"))
        }
        other => format!("{head}{other} {}\n", compact(p)),
    }
}

async fn replay_runs(config: &Config, store: &Store, flags: RunsReplayFlags) -> anyhow::Result<ExitCode> {
    let version = ReplayVersion::from_str(&flags.version).map_err(anyhow::Error::msg)?;
    let originals: Vec<RunId> = match (&flags.id, &flags.tool) {
        (Some(id), _) => vec![run_id(id)?],
        (None, Some(tool)) => {
            let f = filter(Some(tool), Some(&flags.status), flags.since.as_deref(), flags.until.as_deref())?;
            queries::catch_up(store, &["runs"]).await?;
            // Oldest first; selected before any replay is requested, so this command's own
            // replays are never picked up.
            let mut selected: Vec<RunId> = runs::all(store, &f).await?.into_iter().map(|r| r.run_id).collect();
            selected.reverse();
            selected
        }
        (None, None) => anyhow::bail!("name a run to replay, or --tool (with --status, --since, --until) for many"),
    };
    // Only `--execute local` invokes it; with `worker`, requests and watches never do.
    let sandbox = Arc::new(DenoSandbox::start(config.sandbox_config()?)?);
    let engine = RunEngine::new(store.clone(), sandbox.clone(), format!("cli-{}", std::process::id()));
    let opts = ReplayOptions { version, reuse_steps: flags.reuse_steps, actor: Actor::local(), traceparent: None };
    let mut reports = Vec::new();
    let mut failures = 0;
    for original in &originals {
        match replay_one(&engine, *original, &opts, flags.execute).await {
            Ok(report) => {
                if !flags.json {
                    print!("{}", render_report(&report));
                }
                reports.push(serde_json::to_value(&report)?);
            }
            Err(e) => {
                failures += 1;
                eprintln!("replay of {original} failed: {e:#}");
                reports.push(json!({"original": {"runId": original}, "error": format!("{e:#}")}));
            }
        }
    }
    if flags.json {
        let out = if flags.id.is_some() && reports.len() == 1 { reports.remove(0) } else { Value::Array(reports) };
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else if flags.id.is_none() {
        println!("replayed {} run(s), {failures} could not be replayed", originals.len() - failures);
    }
    sandbox.shutdown();
    Ok(if failures == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// How long `--execute auto` waits for a worker to start a replay before executing it here.
const AUTO_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

async fn replay_one(
    engine: &RunEngine,
    original: RunId,
    opts: &ReplayOptions,
    executor: Executor,
) -> anyhow::Result<ReplayReport> {
    let before = engine.view(original).await?.with_context(|| format!("no run {original}"))?;
    if !before.is_ended() {
        anyhow::bail!("run {original} has not ended yet ({}); replay it once it has", before.status);
    }
    let requested = replay::request_replay(engine, original, opts).await?;
    let stop = CancellationToken::new();
    let run = requested.run_id;
    let local = (executor != Executor::Worker).then(|| {
        let (engine, stop) = (engine.clone(), stop.clone());
        tokio::spawn(async move {
            if executor == Executor::Auto {
                tokio::select! {
                    _ = stop.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(AUTO_GRACE) => {}
                }
                // Still queued: no worker is taking runs. (If one starts meanwhile, the run's
                // lease makes whichever starts second wait.)
                if engine.view(run).await?.is_none_or(|v| v.status != "queued") {
                    return Ok(());
                }
            }
            replay::execute_here(&engine, run, stop).await
        })
    });
    let after = replay::wait_for_end(engine, requested.run_id).await;
    stop.cancel();
    if let Some(task) = local {
        task.await??;
    }
    Ok(replay::compare(&before, &after?))
}

fn render_report(r: &ReplayReport) -> String {
    let mut out = format!(
        "replay {} of {}: version {} -> {}, {} -> {}\n",
        r.replay.run_id,
        r.original.run_id,
        r.original.tool_version,
        r.replay.tool_version,
        r.original.status,
        r.replay.status
    );
    if r.same {
        out += "  same outcome\n";
    }
    for c in &r.changes {
        out += &match c {
            Change::Added { path, after } => format!("  + {path}: {}\n", compact(after)),
            Change::Removed { path, before } => format!("  - {path}: {}\n", compact(before)),
            Change::Changed { path, before, after } => {
                format!("  ~ {path}: {} -> {}\n", compact(before), compact(after))
            }
        };
    }
    out
}
