"""Shared helpers for Kiln's real-client tests (driven by tests/mcp.rs): a session against a
running Kiln over Streamable HTTP or stdio, and loud checks."""

import contextlib
import json
import sys

import httpx2
from mcp import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client

CHECKS = 0


def check(cond, what, detail=None):
    global CHECKS
    CHECKS += 1
    if not cond:
        print(f"FAILED: {what}", file=sys.stderr)
        if detail is not None:
            print(f"  detail: {detail!r}", file=sys.stderr)
        raise SystemExit(1)
    print(f"ok: {what}")


def text_of(result):
    return "\n".join(c.text for c in result.content if getattr(c, "type", None) == "text")


@contextlib.asynccontextmanager
async def http_session(url, token=None, **kw):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(60, read=120)) as http:
        async with streamable_http_client(url, http_client=http) as streams:
            async with ClientSession(streams[0], streams[1], **kw) as s:
                await s.initialize()
                yield s


@contextlib.asynccontextmanager
async def stdio_session(command, args, env, **kw):
    params = StdioServerParameters(command=command, args=args, env=env)
    async with stdio_client(params) as streams:
        async with ClientSession(streams[0], streams[1], **kw) as s:
            await s.initialize()
            yield s


async def create(s, **definition):
    r = await s.call_tool("tool_create", definition)
    check(not r.is_error, f"tool_create {definition.get('name')}", text_of(r))
    return r.structured_content


def done():
    print(f"{CHECKS} passed, 0 failed")
