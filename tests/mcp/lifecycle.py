"""The full tool lifecycle through the official Python MCP SDK against a running `kiln serve`
(or `kiln mcp --stdio` with --stdio): list, create, list_changed, call, conflicting and good
updates, disable/enable, tool_run, delete; bad input; progress and logging; explicit content.

Usage: lifecycle.py http://127.0.0.1:PORT/mcp
       lifecycle.py --stdio KILN_BINARY DATABASE_URL
"""

import asyncio
import os
import sys

from kiln_client import check, create, done, http_session, stdio_session, text_of

META = {
    "tool_create", "tool_update", "tool_get", "tool_versions", "tool_list", "tool_enable", "tool_disable",
    "tool_delete", "tool_run", "code_eval", "run_get", "run_list", "run_cancel", "run_replay",
}


async def lifecycle(s, changes):
    tools = await s.list_tools()
    names = {t.name for t in tools.tools}
    check(names == META, "a fresh server lists only the meta tools", names)
    check(all(t.output_schema for t in tools.tools), "every meta tool has an outputSchema")

    before = len(changes)
    created = await create(
        s,
        name="add",
        description="Adds two numbers",
        code="export default async function (args) { return { sum: args.a + args.b }; }",
        inputSchema={"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
                     "required": ["a", "b"]},
        outputSchema={"type": "object", "properties": {"sum": {"type": "number"}}, "required": ["sum"]},
    )
    check(created["version"] == 1 and len(created["codeSha256"]) == 64, "create returns version 1 and the code hash",
          created)
    for _ in range(100):
        if len(changes) > before:
            break
        await asyncio.sleep(0.05)
    check(len(changes) > before, "notifications/tools/list_changed arrives after tool_create")

    tools = await s.list_tools()
    add = next((t for t in tools.tools if t.name == "add"), None)
    check(add is not None, "tools/list shows the new tool under its own name")
    check(add.input_schema["required"] == ["a", "b"] and add.output_schema is not None,
          "the listed tool carries its input and output schemas", add)

    r = await s.call_tool("add", {"a": 2, "b": 3})
    check(not r.is_error and r.structured_content == {"sum": 5}, "calling the tool runs it", (text_of(r), r))
    run_id = (r.meta or {}).get("kiln/runId")
    check(run_id is not None, "the result names its durable run", r.meta)
    got = await s.call_tool("run_get", {"runId": run_id})
    check(got.structured_content["status"] == "succeeded" and got.structured_content["output"] == {"sum": 5},
          "run_get shows the recorded run", got.structured_content)

    r = await s.call_tool("add", {"a": "two"})
    t = text_of(r)
    check(r.is_error and "/a" in t and '"b" is a required property' in t,
          "arguments violating the schema come back as a tool error listing each violation", t)

    r = await s.call_tool("tool_update", {"name": "add", "expectedVersion": 7,
                                          "code": "export default async (args) => ({ sum: 0 })"})
    t = text_of(r)
    check(r.is_error and "expected version 7" in t and "current is 1" in t,
          "an update with a stale expectedVersion is a conflict naming both versions", t)

    r = await s.call_tool("tool_update", {
        "name": "add", "expectedVersion": 1,
        "code": "export default async function (args) { return { sum: args.a + args.b + 100 }; }"})
    check(not r.is_error and r.structured_content["version"] == 2, "an update publishes version 2", text_of(r))
    r = await s.call_tool("add", {"a": 2, "b": 3})
    check(r.structured_content == {"sum": 105}, "the next call uses version 2", r.structured_content)
    r = await s.call_tool("tool_run", {"name": "add", "arguments": {"a": 2, "b": 3}, "version": 1})
    check(r.structured_content == {"sum": 5}, "tool_run can still run version 1", r.structured_content)

    versions = await s.call_tool("tool_versions", {"name": "add"})
    vs = versions.structured_content["versions"]
    check([v["version"] for v in vs] == [1, 2] and all(v["actor"] and v["codeSha256"] for v in vs),
          "tool_versions lists both versions with actor and code hash", vs)
    got = await s.call_tool("tool_get", {"name": "add", "version": 1})
    check("args.a + args.b }" in got.structured_content["definition"]["code"], "tool_get returns a version's code")

    r = await s.call_tool("tool_disable", {"name": "add"})
    check(r.structured_content["state"] == "disabled", "tool_disable disables", r.structured_content)
    names = {t.name for t in (await s.list_tools()).tools}
    check("add" not in names, "a disabled tool is not listed")
    r = await s.call_tool("tool_run", {"name": "add", "arguments": {"a": 1, "b": 1}})
    check(r.is_error and "disabled" in text_of(r), "calling a disabled tool fails clearly", text_of(r))
    r = await s.call_tool("tool_enable", {"name": "add", "expectedVersion": 2})
    check(r.structured_content["state"] == "enabled", "tool_enable enables", r.structured_content)

    r = await s.call_tool("tool_run", {"name": "add", "arguments": {"a": 1, "b": 1}, "idempotencyKey": "k1"})
    r2 = await s.call_tool("tool_run", {"name": "add", "arguments": {"a": 1, "b": 1}, "idempotencyKey": "k1"})
    check(r.structured_content == {"sum": 102} and r.meta["kiln/runId"] == r2.meta["kiln/runId"],
          "tool_run calls by name; an idempotency key names one run", (r.meta, r2.meta))

    listed = await s.call_tool("tool_list", {"includeCode": True})
    entry = next(t for t in listed.structured_content["tools"] if t["name"] == "add")
    check(entry["runtime"] is True and "code" in entry, "tool_list marks runtime tools and can include code", entry)

    runs = await s.call_tool("run_list", {"tool": "add", "limit": 2})
    check(len(runs.structured_content["runs"]) == 2 and "nextCursor" in runs.structured_content,
          "run_list pages the tool's runs", runs.structured_content)
    page2 = await s.call_tool("run_list", {"tool": "add", "limit": 50, "cursor": runs.structured_content["nextCursor"]})
    check(len(page2.structured_content["runs"]) == 2, "the cursor gives the next page", page2.structured_content)

    r = await s.call_tool("tool_delete", {"name": "add"})
    check(r.structured_content["state"] == "deleted", "tool_delete deletes", r.structured_content)
    r = await s.call_tool("tool_versions", {"name": "add"})
    check(len(r.structured_content["versions"]) == 2, "a deleted tool keeps its history", r.structured_content)
    try:
        await s.call_tool("add", {"a": 1, "b": 2})
        check(False, "calling a deleted tool by name is refused")
    except Exception as e:  # an MCP protocol error (unknown tool)
        check("add" in str(e), "calling a deleted tool by name is an unknown-tool error", str(e))


async def bad_input(s):
    try:
        await s.call_tool("no_such_tool", {})
        check(False, "an unknown tool is refused")
    except Exception as e:
        check("unknown tool" in str(e), "an unknown tool is a protocol error naming it", str(e))
    r = await s.call_tool("tool_create", {"name": "broken", "description": "d", "code": "const x = ;\nreturn x"})
    t = text_of(r)
    check(r.is_error and "line 1" in t and "code_invalid" in t, "code with a syntax error is refused with its line", t)
    r = await s.call_tool("tool_create", {"name": "9bad", "description": "", "code": "1",
                                          "limits": {"timeoutMs": 0}})
    t = text_of(r)
    check(r.is_error and "name" in t and "description" in t and "limits.timeoutMs" in t,
          "an invalid definition lists every bad field", t)
    r = await s.call_tool("tool_create", {"name": "kiln.sneaky", "description": "d", "code": "1"})
    check(r.is_error and "reserved" in text_of(r), "reserved names are refused", text_of(r))
    await create(s, name="thrower", description="throws", code="throw new TypeError('nope')",
                 retry={"maxAttempts": 1})
    r = await s.call_tool("thrower", {})
    check(r.is_error and "nope" in text_of(r) and "user_error" in text_of(r),
          "a tool that throws is a tool error with its message", text_of(r))
    r = await s.call_tool("tool_create", {"name": "thrower", "description": "again", "code": "1"})
    check(r.is_error and "already exists" in text_of(r), "creating an existing tool is refused", text_of(r))
    await create(s, name="liar", description="breaks its outputSchema", code="return { n: 'x' }",
                 outputSchema={"type": "object", "properties": {"n": {"type": "number"}}, "required": ["n"]})
    r = await s.call_tool("liar", {})
    check(r.is_error and "outputSchema" in text_of(r), "output violating the outputSchema is a tool error",
          text_of(r))


async def history(s):
    """run_get's timeline, run_list's filters, run_replay (one run and in bulk) and its refusals."""
    await create(s, name="halver", description="halves an even n",
                 code="export default async function (args, ctx) {\n"
                      "  const seen = await ctx.step('read', async () => ({ n: args.n }));\n"
                      "  if (seen.n % 2) throw new Error(`odd: ${seen.n}`);\n"
                      "  return { half: seen.n / 2 };\n}",
                 retry={"maxAttempts": 1})
    r = await s.call_tool("halver", {"n": 3})
    check(r.is_error and "odd: 3" in text_of(r), "the buggy tool fails on odd input", text_of(r))
    failed = r.meta["kiln/runId"]
    r = await s.call_tool("halver", {"n": 4})
    check(r.structured_content == {"half": 2}, "and halves even input", text_of(r))

    got = (await s.call_tool("run_get", {"runId": failed, "includeTimeline": True})).structured_content
    types = [e["type"] for e in got["timeline"]]
    check(types[0] == "run.requested" and "run.attempt_failed" in types and types[-1] == "run.failed",
          "run_get with includeTimeline shows every event of the run", types)
    step = next(e for e in got["timeline"] if e["type"] == "run.step_completed")
    check(step["payload"]["key"] == "read" and step["payload"]["result"] == {"n": 3},
          "the timeline carries the recorded step result", step)
    check(got["children"] == [] and got["replays"] == [] and got["arguments"] == {"n": 3},
          "and the run's arguments, children and replays", got)
    check("timeline" not in (await s.call_tool("run_get", {"runId": failed})).structured_content,
          "run_get leaves the timeline out unless asked")

    r = await s.call_tool("run_replay", {"runId": failed})
    rep = r.structured_content
    check(not r.is_error and rep["replayOf"] == failed and rep["status"] == "failed" and rep["diff"]["same"],
          "a replay on the recorded version fails the same way", (text_of(r), rep))
    check(rep["error"]["message"] == "odd: 3" and rep["toolVersion"] == 1, "and reports the error", rep)

    r = await s.call_tool("tool_update", {"name": "halver", "code":
                          "export default async function (args, ctx) {\n"
                          "  const seen = await ctx.step('read', async () => ({ n: args.n }));\n"
                          "  return { half: seen.n / 2 };\n}"})
    check(not r.is_error, "the fix is published", text_of(r))
    r = await s.call_tool("run_replay", {"runId": failed, "version": "latest", "reuseSteps": True})
    rep = r.structured_content
    changes = {(c["kind"], c["path"]) for c in rep["diff"]["changes"]}
    check(rep["status"] == "succeeded" and rep["output"] == {"half": 1.5} and rep["toolVersion"] == 2,
          "a replay on the latest version succeeds", rep)
    check(changes == {("changed", "/status"), ("removed", "/error"), ("added", "/output")} and not rep["diff"]["same"],
          "and the diff shows the change", rep["diff"])
    r = await s.call_tool("run_replay", {"runId": failed, "version": 1, "waitMs": 0})
    check(not r.is_error and r.structured_content["replayOf"] == failed and "diff" not in r.structured_content,
          "waitMs 0 answers with the new run's handle", r.structured_content)
    pending = r.structured_content["runId"]
    for _ in range(100):
        got = (await s.call_tool("run_get", {"runId": pending})).structured_content
        if got["status"] == "failed":
            break
        await asyncio.sleep(0.05)
    check(got["status"] == "failed" and got["replayOf"] == failed, "the handle's run ends on the queue", got)

    actor = got["actor"]
    runs = (await s.call_tool("run_list", {"tool": "halver", "status": "failed"})).structured_content["runs"]
    check(len(runs) == 3 and runs[0]["runId"] == pending and runs[-1]["runId"] == failed,
          "run_list filters by tool and status, newest first", runs)
    check(sum(1 for r in runs if r.get("replayOf") == failed) == 2, "listed runs name what they replayed", runs)
    runs = (await s.call_tool("run_list", {"tool": "halver", "actor": actor, "since": "2020-01-01"})).structured_content
    check(len(runs["runs"]) == 5, "run_list filters by actor and time", runs)
    runs = (await s.call_tool("run_list", {"tool": "halver", "until": "2020-01-01"})).structured_content
    check(runs["runs"] == [], "until bounds the request time", runs)
    r = await s.call_tool("run_list", {"since": "yesterday"})
    check(r.is_error and "since" in text_of(r), "a bad time is refused naming the field", text_of(r))
    r = await s.call_tool("run_list", {"cursor": "page-2"})
    check(r.is_error and "cursor" in text_of(r), "a bad cursor is refused", text_of(r))

    r = await s.call_tool("run_replay", {"tool": "halver", "version": "latest", "limit": 2})
    bulk = r.structured_content
    check(not r.is_error and bulk["selected"] == 2 and bulk["more"] == 1, "bulk replay selects failed runs up to limit",
          bulk)
    check(bulk["replays"][0]["replayOf"] == failed and all(x["status"] == "succeeded" for x in bulk["replays"]),
          "oldest first, each replayed on the fix", bulk)

    for args, expect, what in [
        ({"runId": "0192f1a0-0000-7000-8000-000000000000"}, "no run", "an unknown run id"),
        ({"runId": "not-a-run"}, "not a run id", "a malformed run id"),
        ({"runId": failed, "version": "newest"}, "version must be", "a bad version"),
        ({"runId": failed, "version": 0}, "version must be", "version 0"),
        ({"runId": failed, "version": 9}, "no version 9", "a version the tool does not have"),
        ({"runId": failed, "tool": "halver"}, "not both", "runId and tool together"),
        ({"runId": failed, "status": "failed"}, "with tool", "a bulk filter with runId"),
        ({"tool": "halver", "limit": 1000}, "limit", "a bulk limit over the maximum"),
        ({}, "runId", "no run named"),
    ]:
        r = await s.call_tool("run_replay", args)
        check(r.is_error and expect in text_of(r), f"run_replay refuses {what}", text_of(r))

    # A run still going cannot be replayed yet: replay a slow run without waiting, then ask to
    # replay that replay while it runs.
    await create(s, name="napper", description="answers after a while",
                 code="async () => { await new Promise((r) => setTimeout(r, 1500)); return { ok: true }; }")
    napped = (await s.call_tool("napper", {})).meta["kiln/runId"]
    going = (await s.call_tool("run_replay", {"runId": napped, "waitMs": 0})).structured_content["runId"]
    r = await s.call_tool("run_replay", {"runId": going})
    check(r.is_error and "has not ended yet" in text_of(r) and going in text_of(r),
          "replaying a run that has not ended is refused, naming it", text_of(r))

    await s.call_tool("tool_delete", {"name": "halver"})
    r = await s.call_tool("run_replay", {"runId": failed})
    check(r.is_error and "deleted" in text_of(r) and failed in text_of(r),
          "replaying a run of a deleted tool is refused", text_of(r))
    got = (await s.call_tool("run_get", {"runId": failed, "includeTimeline": True})).structured_content
    check(len(got["replays"]) == 4, "the original lists its replays", got["replays"])


async def notifications_and_content(s, progress, logs):
    await create(s, name="reporter", description="reports progress and logs",
                 code="export default async function (args, ctx) {\n"
                      "  ctx.log('info', 'starting');\n"
                      "  for (let i = 1; i <= 3; i++) { ctx.progress(i, 3, `step ${i}`); await new Promise(r => setTimeout(r, 20)); }\n"
                      "  ctx.log('warn', 'done');\n"
                      "  return { steps: 3 };\n}")

    async def on_progress(done, total, message):
        progress.append((done, total, message))

    r = await s.call_tool("reporter", {}, progress_callback=on_progress)
    check(not r.is_error and r.structured_content == {"steps": 3}, "the reporting tool runs", text_of(r))
    check([p[0] for p in progress] == [1, 2, 3] and progress[-1][1] == 3 and progress[-1][2] == "step 3",
          "ctx.progress arrives as progress notifications", progress)
    check([l.data for l in logs] == ["starting", "done"] and logs[1].level == "warning",
          "ctx.log arrives as logging notifications", logs)

    await create(s, name="picture", description="explicit content",
                 code="export default async (args, ctx) => ctx.content([ctx.content.text('a red dot'), "
                      "ctx.content.image(new Uint8Array([137, 80, 78, 71]), 'image/png'), "
                      "ctx.content.resource({ uri: 'kiln://note', mimeType: 'text/plain', text: 'hi' })], { ok: true })")
    r = await s.call_tool("picture", {})
    kinds = [c.type for c in r.content]
    check(not r.is_error and kinds == ["text", "image", "resource"], "ctx.content returns explicit MCP content", kinds)
    check(r.content[1].data == "iVBORw==" and r.content[1].mime_type == "image/png" and r.structured_content == {"ok": True},
          "image bytes are base64 and the structured part goes along", r)

    r = await s.call_tool("code_eval", {"code": "args.n * 2", "arguments": {"n": 21}})
    check(not r.is_error and r.structured_content == {"result": 42} and r.meta.get("kiln/runId"),
          "code_eval runs one-off code as a recorded run", (text_of(r), r.meta))
    names = {t.name for t in (await s.list_tools()).tools}
    check(not any(n.startswith("kiln.") for n in names), "code_eval's hidden tool is not listed", names)


async def main():
    changes, progress, logs = [], [], []

    async def on_message(m):
        if getattr(m, "method", None) == "notifications/tools/list_changed":
            changes.append(m)

    async def on_log(params):
        logs.append(params)

    kw = {"message_handler": on_message, "logging_callback": on_log}
    if sys.argv[1] == "--stdio":
        kiln, db = sys.argv[2], sys.argv[3]
        env = {"KILN_DATABASE_URL": db, "KILN_DENO": os.environ["KILN_DENO"], "RUST_LOG": "warn",
               "PATH": os.environ.get("PATH", "")}
        session = stdio_session(kiln, ["mcp", "--stdio"], env, **kw)
    else:
        session = http_session(sys.argv[1], **kw)
    async with session as s:
        await lifecycle(s, changes)
        await bad_input(s)
        await history(s)
        await notifications_and_content(s, progress, logs)
    done()


asyncio.run(main())
