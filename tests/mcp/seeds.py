"""The seed documents' example tools, verbatim (shared/seeds), through the Python MCP SDK:
  - the Deno weather tool (`context.city`, fetch, JSON) against a loopback HTTP server its
    permissions allow (the one change: the URL's host, since tests reach only this machine);
  - the runtime multiply tool `(args) => args.x * args.y`, found with tool_list (runtime: true)
    and called through tool_run, as clients that cache their tool list do;
  - the `text.uppercase` body `const { text } = args; return {...}`.

Usage: seeds.py http://127.0.0.1:PORT/mcp
"""

import asyncio
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

from kiln_client import check, create, done, http_session, text_of

SEEN = []


class Weather(BaseHTTPRequestHandler):
    def do_GET(self):
        SEEN.append(self.path)
        body = json.dumps({"temp": 21.5, "weather": [{"description": "light rain"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


async def main():
    url = sys.argv[1]
    httpd = HTTPServer(("127.0.0.1", 0), Weather)
    port = httpd.server_address[1]
    threading.Thread(target=httpd.serve_forever, daemon=True).start()

    weather_code = (
        f"const response = await fetch(`http://127.0.0.1:{port}/${{context.city}}`);\n"
        "const data = await response.json();\n"
        "return { temp: data.temp, conditions: data.weather[0].description };"
    )
    async with http_session(url) as s:
        await create(s, name="weather", description="Current weather for a city", code=weather_code,
                     inputSchema={"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
                     permissions={"network": [f"127.0.0.1:{port}"]})
        r = await s.call_tool("weather", {"city": "Lisbon"})
        check(not r.is_error and r.structured_content == {"temp": 21.5, "conditions": "light rain"},
              "the seed weather tool runs unchanged against the loopback server", text_of(r))
        check(SEEN == ["/Lisbon"], "it fetched the city's URL", SEEN)
        await create(s, name="weather-unpermitted", description="same code, no network permission", code=weather_code,
                     retry={"maxAttempts": 1})
        r = await s.call_tool("weather-unpermitted", {"city": "Lisbon"})
        check(r.is_error and "permission_denied" in text_of(r) and f"127.0.0.1:{port}" in text_of(r),
              "without the permission the same code is denied the network", text_of(r))

        await create(s, name="multiply", description="x times y", code="(args) => args.x * args.y")
        await create(s, name="square-number", description="n squared", code="(args) => args.n * args.n")
        listed = await s.call_tool("tool_list", {})
        runtime = {t["name"] for t in listed.structured_content["tools"] if t["runtime"] is True}
        check({"multiply", "square-number", "weather"} <= runtime, "tool_list shows the runtime tools marked", runtime)
        r = await s.call_tool("tool_run", {"name": "multiply", "arguments": {"x": 6, "y": 7}})
        check(r.structured_content == {"result": 42} and text_of(r) == "42",
              "the seed multiply tool runs through tool_run", text_of(r))
        r = await s.call_tool("tool_run", {"name": "square-number", "arguments": {"n": 12}})
        check(r.structured_content == {"result": 144}, "square-number runs through tool_run", text_of(r))

        await create(s, name="text.uppercase", description="Convert text to uppercase",
                     code="const { text } = args;\nreturn { upper: String(text).toUpperCase() };")
        r = await s.call_tool("text.uppercase", {"text": "hello world"})
        check(r.structured_content == {"upper": "HELLO WORLD"}, "the seed text.uppercase body runs unchanged",
              text_of(r))
    httpd.shutdown()
    done()


asyncio.run(main())
