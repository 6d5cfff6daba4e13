"""MCP tasks (the io.modelcontextprotocol/tasks extension, SEP-2663) against a `kiln serve` whose
call budget is short. The official Python SDK has no tasks extension of its own, so this script
declares one through the SDK's extension interface (a result claim for `resultType: "task"`
resolved by polling `tasks/get`), on the 2026-07-28 protocol where the SDK activates claims.

Usage: tasks.py URL    prints "cancelled-run: <id>" for the Rust test to check the log.
"""

import asyncio
import sys
from typing import Any, ClassVar, Literal

import mcp_types as types
from mcp.client import Client
from mcp.client.extension import ClaimContext, ClientExtension, NotificationBinding, ResultClaim

from kiln_client import check, create, done, http_session, text_of

TASKS = "io.modelcontextprotocol/tasks"


class CreateTask(types.Result):
    """`tools/call` answered with a task."""
    result_type: Literal["task"]
    task_id: str
    status: str
    poll_interval_ms: int | None = None
    ttl_ms: int | None = None


class TaskState(types.Result):
    """A `tasks/get` answer: the task, and its result or error once it has ended."""
    task_id: str
    status: str
    status_message: str | None = None
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None


class TaskNote(types.NotificationParams):
    """`notifications/tasks`: the task as `tasks/get` would give it."""
    task_id: str
    status: str
    result: dict[str, Any] | None = None


class TaskParams(types.RequestParams):
    task_id: str


class GetTask(types.Request[TaskParams, Literal["tasks/get"]]):
    method: Literal["tasks/get"] = "tasks/get"
    name_param: ClassVar[str | None] = "taskId"


class CancelTask(types.Request[TaskParams, Literal["tasks/cancel"]]):
    method: Literal["tasks/cancel"] = "tasks/cancel"
    name_param: ClassVar[str | None] = "taskId"


async def get_task(session, task_id):
    return await session.send_request(GetTask(params=TaskParams(task_id=task_id)), TaskState)


async def wait_task(session, task_id, timeout=60):
    for _ in range(int(timeout * 10)):
        state = await get_task(session, task_id)
        if state.status in ("completed", "failed", "cancelled"):
            return state
        await asyncio.sleep(0.1)
    raise AssertionError(f"task {task_id} did not end")


async def resolve(task: CreateTask, ctx: ClaimContext) -> types.CallToolResult:
    state = await wait_task(ctx.session, task.task_id)
    if state.status != "completed":
        raise RuntimeError(f"task {task.task_id} ended {state.status}: {state.error}")
    return types.CallToolResult.model_validate(state.result)


class Tasks(ClientExtension):
    identifier = TASKS

    def claims(self):
        return [ResultClaim(result_type="task", model=CreateTask, resolve=resolve)]


SLOW = "async () => { await new Promise((r) => setTimeout(r, 1500)); return { done: true }; }"
LONG = "async () => { await new Promise((r) => setTimeout(r, 60000)); return { done: true }; }"


async def main(url):
    # A client without the extension keeps today's answer: a run handle to follow with run_get.
    async with http_session(url) as s:
        await create(s, name="slow", description="answers after 1.5 s", code=SLOW)
        await create(s, name="long", description="answers after a minute", code=LONG)
        r = await s.call_tool("slow", {})
        handle = r.structured_content or {}
        check(not r.is_error and "runId" in handle and "run_get" in text_of(r),
              "without tasks, a call past the budget answers with a run handle", r)

    # A session client (2025-11-25) that declares the extension gets the task too, and
    # notifications/tasks with the result when the run ends. The SDK parses claimed results only on
    # 2026-07-28, so this call goes through its raw request path.
    notes = asyncio.Queue()

    async def on_task(note):
        await notes.put(note)

    binding = NotificationBinding(method="notifications/tasks", params_type=TaskNote, handler=on_task)
    async with http_session(url, extensions={TASKS: {}}, notification_bindings=[binding]) as s:
        raw = await s._dispatcher.send_raw_request("tools/call", {"name": "slow", "arguments": {}}, {})
        check(raw.get("resultType") == "task" and raw.get("status") == "working",
              "a session client that declared tasks gets a task", raw)
        note = await asyncio.wait_for(notes.get(), timeout=30)
        check(note.task_id == raw["taskId"] and note.status == "completed"
              and note.result["structuredContent"] == {"done": True},
              "notifications/tasks brings the result when the run ends", note)

    async with Client(url, mode="auto", extensions=[Tasks()]) as c:
        caps = c.session.discover_result.capabilities if c.session.discover_result else None
        check(caps is not None and TASKS in (caps.extensions or {}), "the server advertises the tasks extension",
              caps)

        # The claim resolves the task transparently: the caller just gets the tool's result.
        r = await c.call_tool("slow", {})
        check(not r.is_error and r.structured_content == {"done": True},
              "a task-aware client gets the result through tasks/get", r)

        # The task itself: its id is the run's, and run_get agrees about it.
        task = await c.session.call_tool("slow", {}, allow_claimed=True)
        check(isinstance(task, CreateTask) and task.status == "working",
              "past the budget a task-aware client gets a working task", task)
        run = await c.call_tool("run_get", {"runId": task.task_id})
        check(not run.is_error and run.structured_content["runId"] == task.task_id, "the task id is the run id",
              text_of(run))
        state = await wait_task(c.session, task.task_id)
        check(state.status == "completed" and state.result["structuredContent"] == {"done": True}
              and state.result["_meta"]["kiln/runId"] == task.task_id,
              "tasks/get gives the run's tools/call result once it ends", state)

        # The proxies answer the same way: tool_run and code_eval past the budget give a task.
        t = await c.session.call_tool("tool_run", {"name": "slow", "arguments": {}}, allow_claimed=True)
        check(isinstance(t, CreateTask), "tool_run past the budget gives a task", t)
        state = await wait_task(c.session, t.task_id)
        check(state.status == "completed" and state.result["structuredContent"] == {"done": True},
              "tool_run's task completes with the tool's result", state)
        t = await c.session.call_tool("code_eval", {"code": SLOW}, allow_claimed=True)
        check(isinstance(t, CreateTask), "code_eval past the budget gives a task", t)
        state = await wait_task(c.session, t.task_id)
        check(state.status == "completed" and state.result["structuredContent"] == {"done": True},
              "code_eval's task completes with the code's result", state)

        # A tool error is a completed task whose result has isError.
        await c.call_tool("tool_create", {"name": "slow_fail", "description": "fails late",
                                           "code": "async () => { await new Promise((r) => setTimeout(r, 1000)); "
                                                   "throw new Error('late failure'); }",
                                           "retry": {"maxAttempts": 1}})
        t = await c.session.call_tool("slow_fail", {}, allow_claimed=True)
        state = await wait_task(c.session, t.task_id)
        check(state.status == "completed" and state.result.get("isError") is True
              and "late failure" in str(state.result), "a failing run completes its task with isError", state)

        # tasks/cancel cancels the run.
        t = await c.session.call_tool("long", {}, allow_claimed=True)
        await c.session.send_request(CancelTask(params=TaskParams(task_id=t.task_id)), types.EmptyResult)
        state = await wait_task(c.session, t.task_id)
        check(state.status == "cancelled", "tasks/cancel cancels the task's run", state)
        run = await c.call_tool("run_get", {"runId": t.task_id})
        check(run.structured_content["status"] == "cancelled", "the run is cancelled too", text_of(run))
        print(f"cancelled-run: {t.task_id}")

        # An unknown task is an error, not a crash.
        try:
            await get_task(c.session, "0192f000-0000-7000-8000-000000000000")
            check(False, "an unknown task is refused")
        except Exception as e:  # noqa: BLE001 - any MCP error will do; its text is checked
            check("no task" in str(e), "an unknown task is refused, naming it", str(e))
    done()


asyncio.run(main(sys.argv[1]))
