"""Authentication, scopes, host grants and transport guards against a `kiln serve` started with
`auth.required = true`, through the Python MCP SDK and raw HTTP.

Usage: security.py URL ADMIN_KEY READER_KEY NARROW_KEY REPLAYER_KEY
  ADMIN_KEY:  scopes admin, allowed host allowed.example.com
  READER_KEY: scope tools:read only
  NARROW_KEY: tools:write + tools:run + tools:read (no runs:read), allowed host allowed.example.com
  REPLAYER_KEY: tools:read + tools:run + runs:read (no tools:write)
"""

import asyncio
import json
import sys
import urllib.error
import urllib.request

from kiln_client import check, create, done, http_session, text_of

INIT = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}}}


def post(url, body, headers=None):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    h = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
    h.update(headers or {})
    req = urllib.request.Request(url, data=data, headers=h, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read().decode()


def get(url):
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.status, json.loads(r.read().decode())


def get_status(url, token=None):
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


async def main():
    url, admin, reader, narrow, replayer = sys.argv[1:6]
    base = url.rsplit("/mcp", 1)[0]

    status, headers, _ = post(url, INIT)
    challenge = headers.get("www-authenticate", "")
    check(status == 401 and challenge.startswith("Bearer ") and "resource_metadata=" in challenge,
          "no token: 401 with a WWW-Authenticate naming the resource metadata", (status, headers))
    meta_url = challenge.split('resource_metadata="', 1)[1].split('"', 1)[0]
    status, meta = get(meta_url)
    check(status == 200 and meta["resource"].endswith("/mcp") and "tools:run" in meta["scopes_supported"],
          "the protected-resource metadata document is served", meta)

    status, headers, _ = post(url, INIT, {"Authorization": "Bearer kiln_0123456789abcdef_" + "0" * 64})
    check(status == 401 and 'error="invalid_token"' in headers.get("www-authenticate", ""),
          "an unknown key: 401 invalid_token", (status, headers))
    status, _, _ = post(url, INIT, {"Authorization": "Bearer not-a-jwt"})
    check(status == 401, "a malformed token: 401", status)

    status, _, body = post(url, INIT, {"Authorization": f"Bearer {admin}", "Origin": "https://evil.example.com"})
    check(status == 403, "a foreign Origin is refused (DNS rebinding protection)", (status, body))
    status, _, body = post(url, INIT, {"Authorization": f"Bearer {admin}", "Host": "evil.example.com"})
    check(status == 403, "a foreign Host is refused (DNS rebinding protection)", (status, body))
    big = json.dumps({"jsonrpc": "2.0", "id": 2, "method": "ping", "params": {"pad": "x" * (5 << 20)}}).encode()
    status, _, body = post(url, big, {"Authorization": f"Bearer {admin}"})
    check(status == 413, "an oversized body: 413", (status, body[:200]))

    call = {"jsonrpc": "2.0", "id": 3, "method": "tools/call",
            "params": {"name": "tool_create", "arguments": {"name": "x", "description": "d", "code": "1"}}}
    status, headers, body = post(url, call, {"Authorization": f"Bearer {reader}"})
    challenge = headers.get("www-authenticate", "")
    check(status == 403 and 'error="insufficient_scope"' in challenge and 'scope="tools:write"' in challenge,
          "a key without tools:write: 403 insufficient_scope naming it", (status, headers, body))

    replay = {"jsonrpc": "2.0", "id": 4, "method": "tools/call",
              "params": {"name": "run_replay", "arguments": {"runId": "0192f1a0-0000-7000-8000-000000000000"}}}
    status, headers, body = post(url, replay, {"Authorization": f"Bearer {narrow}"})
    challenge = headers.get("www-authenticate", "")
    check(status == 403 and 'scope="runs:read"' in challenge,
          "run_replay needs runs:read besides tools:run: it reads the original's arguments and outcome",
          (status, headers, body))
    status, headers, body = post(url, replay, {"Authorization": f"Bearer {reader}"})
    check(status == 403 and 'scope="tools:run"' in headers.get("www-authenticate", ""),
          "and tools:run: it starts a run", (status, headers, body))

    check(get_status(base + "/v1/audit.jsonl") == 401, "the audit export needs a credential")
    check(get_status(base + "/v1/audit.jsonl", reader) == 403, "the audit export needs audit:read")
    check(get_status(base + "/v1/runs", reader) == 403, "run history needs runs:read")
    check(get_status(base + "/v1/runs", admin) == 200, "an admin key reads run history")

    async with http_session(url, token=reader) as s:
        tools = await s.list_tools()
        check(len(tools.tools) >= 13, "a tools:read key lists tools")
        try:
            await s.call_tool("tool_create", {"name": "x", "description": "d", "code": "1"})
            check(False, "the SDK sees the 403")
        except Exception as e:
            check("error" in str(e).lower(), "the SDK reports the refused call as an error", str(e))

    async with http_session(url, token=narrow) as s:
        r = await s.call_tool("tool_create", {"name": "exfil", "description": "d", "code": "1",
                                              "permissions": {"network": ["attacker.example.net"]}})
        t = text_of(r)
        check(r.is_error and "attacker.example.net" in t and "permission_denied" in t,
              "declaring a host beyond the creator's grant is refused", t)
        r = await s.call_tool("code_eval", {"code": "1", "permissions": {"network": ["attacker.example.net"]}})
        check(r.is_error and "attacker.example.net" in text_of(r), "code_eval cannot exceed the grant either",
              text_of(r))
        created = await create(s, name="fine", description="d", code="(args) => args.n + 1",
                               permissions={"network": ["allowed.example.com:443"]})
        check(created["version"] == 1, "a host within the grant is accepted")
        r = await s.call_tool("fine", {"n": 1})
        check(r.structured_content == {"result": 2}, "the narrow key runs its tool", text_of(r))
        got = await s.call_tool("tool_versions", {"name": "fine"})
        check(got.structured_content["versions"][0]["actor"] == "key:narrow",
              "the key's actor is recorded in the tool's events", got.structured_content)
        ran = r.meta["kiln/runId"]
        evaled = (await s.call_tool("code_eval", {"code": "args.n * 3", "arguments": {"n": 2}})).meta["kiln/runId"]

    async with http_session(url, token=replayer) as s:
        r = await s.call_tool("run_replay", {"runId": ran})
        rep = r.structured_content
        check(not r.is_error and rep["status"] == "succeeded" and rep["diff"]["same"],
              "a key with tools:run and runs:read replays another key's run", (text_of(r), rep))
        got = await s.call_tool("run_get", {"runId": rep["runId"]})
        check(got.structured_content["actor"] == "key:replayer" and got.structured_content["replayOf"] == ran,
              "the replay is the replaying key's run", got.structured_content)
        r = await s.call_tool("run_replay", {"runId": evaled})
        check(r.is_error and "tools:write" in text_of(r),
              "replaying code_eval's one-off code needs tools:write, as code_eval does", text_of(r))
    done()


asyncio.run(main())
