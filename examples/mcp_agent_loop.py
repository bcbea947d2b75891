"""The scripted agent loop of agent_loop.py, through MCP: it starts `petri mcp` over stdio with
the official MCP client library and calls its tools, as an MCP host (a desktop app, an agent
framework) would for its model. The server deletes its sandbox when the client goes.

Run: pip install './client[mcp]', then PETRI_ADDR=host:port python examples/mcp_agent_loop.py
(the server gets this process's environment: PETRI_TOKEN, PETRI_PROJECT...).
"""

from __future__ import annotations

import asyncio
import os
import sys

from agent_loop import FIXES, PLAN, Step
from mcp import Client, StdioServerParameters
from mcp_types import CallToolResult, TextContent

# The MCP server as a command; `petri mcp` where the petri CLI is installed on PATH.
SERVER = StdioServerParameters(
    command=sys.executable,
    args=["-m", "petri.cli", "mcp", "--label", "example=mcp-agent-loop", "--ttl", "10m"],
    env=dict(os.environ),
)


def text_of(result: CallToolResult) -> str:
    return "\n".join(c.text for c in result.content if isinstance(c, TextContent))


async def act(client: Client, step: Step) -> CallToolResult:
    print(f"> {step.thought}")
    result = await client.call_tool("run_python", {"code": step.code, "timeout_seconds": 60})
    print("  " + text_of(result).replace("\n", "\n  "))
    return result


async def run_agent(client: Client) -> str:
    for step in PLAN:
        result = await act(client, step)
        if result.is_error:
            # A model reads the error text (the traceback) and decides what to do next.
            fix = next((f for name, f in FIXES.items() if name in text_of(result)), None)
            if fix is None:
                raise RuntimeError("no fix for: " + text_of(result))
            result = await act(client, fix)
            if result.is_error:
                raise RuntimeError("the fix failed too: " + text_of(result))
    report = await client.call_tool("download_file", {"path": "report.md"})
    if report.is_error:
        raise RuntimeError(text_of(report))
    return text_of(report)


async def main() -> int:
    async with Client(SERVER) as client:
        tools = await client.list_tools()
        print("tools:", ", ".join(t.name for t in tools.tools))
        try:
            report = await run_agent(client)
        except RuntimeError as error:
            print(error, file=sys.stderr)
            return 1
    print(report, end="")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
