"""Creates the MCP conformance suite's fixture tools at runtime, through `tool_create`, as
ordinary Kiln tools (JavaScript run in the sandbox, explicit content through `ctx.content`).

Usage: conformance_fixtures.py http://127.0.0.1:PORT/mcp
"""

import asyncio
import base64
import io
import sys
import wave

from kiln_client import create, done, http_session

# A 1x1 red PNG.
PNG = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8DwHwAFBQIAX8jx0gAAAABJRU5ErkJggg==")


def tiny_wav():
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(b"\x00\x00" * 8)
    return base64.b64encode(buf.getvalue()).decode()


SLEEP = "const sleep = (ms) => new Promise((r) => setTimeout(r, ms));\n"

FIXTURES = {
    "test_simple_text": 'return "This is a simple text response for testing.";',
    "test_image_content": f'return ctx.content([ctx.content.image("{PNG}", "image/png")]);',
    "test_audio_content": f'return ctx.content([ctx.content.audio("{tiny_wav()}", "audio/wav")]);',
    "test_embedded_resource": (
        "return ctx.content([ctx.content.resource({ uri: 'test://embedded-resource', mimeType: 'text/plain', "
        "text: 'This is an embedded resource content.' })]);"
    ),
    "test_multiple_content_types": (
        f"return ctx.content(['Multiple content types test:', ctx.content.image('{PNG}', 'image/png'), "
        "ctx.content.resource({ uri: 'test://mixed-content-resource', mimeType: 'application/json', "
        "text: JSON.stringify({ test: 'data', value: 123 }) })]);"
    ),
    "test_error_handling": 'throw new Error("This tool intentionally returns an error for testing");',
    "test_tool_with_logging": SLEEP + (
        "ctx.log('info', 'Tool execution started');\nawait sleep(50);\n"
        "ctx.log('info', 'Tool processing data');\nawait sleep(50);\n"
        "ctx.log('info', 'Tool execution completed');\n"
        "return 'Tool with logging executed successfully';"
    ),
    "test_tool_with_progress": SLEEP + (
        "ctx.progress(0, 100);\nawait sleep(50);\nctx.progress(50, 100);\nawait sleep(50);\n"
        "ctx.progress(100, 100);\nreturn 'Tool with progress executed successfully';"
    ),
}


async def main():
    async with http_session(sys.argv[1]) as s:
        for name, code in FIXTURES.items():
            await create(s, name=name, description=f"MCP conformance fixture {name}", code=code,
                         inputSchema={"type": "object", "properties": {}}, retry={"maxAttempts": 1})
    done()


asyncio.run(main())
