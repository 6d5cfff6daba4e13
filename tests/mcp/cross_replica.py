"""Two Kiln processes on one PostgreSQL database: a catalog change made through one reaches the
sessions of the other (list_changed driven by the log), and a call through an API-only replica
runs on the other process's worker.

Usage: cross_replica.py URL_A URL_B
"""

import asyncio
import sys

from kiln_client import check, create, done, http_session, text_of


async def wait_for(events, n, what):
    for _ in range(200):
        if len(events) >= n:
            break
        await asyncio.sleep(0.05)
    check(len(events) >= n, what, len(events))


async def main():
    url_a, url_b = sys.argv[1], sys.argv[2]
    seen_a, seen_b = [], []

    def collector(seen):
        async def on_message(m):
            if getattr(m, "method", None) == "notifications/tools/list_changed":
                seen.append(m)
        return on_message

    async with http_session(url_a, message_handler=collector(seen_a)) as a, \
            http_session(url_b, message_handler=collector(seen_b)) as b:
        await create(a, name="replicated", description="made on A", code="(args) => ({ doubled: args.n * 2 })")
        await wait_for(seen_b, 1, "a session on replica B is told of a tool created through replica A")
        names = {t.name for t in (await b.list_tools()).tools}
        check("replicated" in names, "replica B lists the tool", names)
        r = await b.call_tool("replicated", {"n": 21})
        check(not r.is_error and r.structured_content == {"doubled": 42},
              "a call through the API-only replica runs on the other's worker", text_of(r))
        before = len(seen_a)
        r = await b.call_tool("tool_disable", {"name": "replicated"})
        check(not r.is_error, "disable through replica B", text_of(r))
        await wait_for(seen_a, before + 1, "replica A's session is told of the change made through B")
        names = {t.name for t in (await a.list_tools()).tools}
        check("replicated" not in names, "replica A no longer lists the disabled tool", names)
    done()


asyncio.run(main())
