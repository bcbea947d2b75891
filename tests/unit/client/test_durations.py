"""A timeout or ttl that no duration can hold (NaN, infinity) is a ValueError before any call,
not an OverflowError from inside the request stream's thread."""

from __future__ import annotations

import math
from datetime import timedelta

import pytest
from mcp.server.mcpserver.exceptions import ToolError

from petri import Client, Sandbox
from petri.mcp.tools import check_timeout
from petri.sdk.requests import create_request, run_deadline
from petri.v1 import sandbox_pb2


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_a_non_finite_duration_is_a_value_error(value: float) -> None:
    with pytest.raises(ValueError, match="finite"):
        run_deadline(value)
    with pytest.raises(ValueError, match="finite"):
        create_request("p", ttl=value)
    with Client(addr="127.0.0.1:1") as client:  # nothing is called: the check comes first
        sandbox = Sandbox(sandbox_pb2.Sandbox(name="projects/p/sandboxes/x"), client)
        with pytest.raises(ValueError, match="finite"):
            sandbox.run("1", timeout=value)
    with pytest.raises(ToolError, match="positive"):
        check_timeout(value)


def test_finite_durations_pass() -> None:
    assert run_deadline(1.5) == 61.5 and run_deadline(timedelta(seconds=2)) == 62
    assert create_request("p", ttl=30).sandbox.ttl.seconds == 30
    check_timeout(0.5)
    check_timeout(None)
    with pytest.raises(ToolError):
        check_timeout(0)
