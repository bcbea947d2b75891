"""A cold create's preload, through the real API into real sandboxes (issue 16): CreateSandbox
does not wait for it, and a first execution sent at once stops it (after the module being
imported) and runs correctly, importing what it needs itself; a preload that fails does not
break executions.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import grpc
import pytest

from controller.app import Controller, start_controller
from controller.config import Config
from petri.v1 import sandbox_pb2, sandbox_pb2_grpc
from tests.e2e.helpers import PARENT, execute, sibling_config, value_of

if TYPE_CHECKING:
    from petri.v1.sandbox_pb2_grpc import SandboxServiceAsyncStub as Stub
    from tests.conftest import CreateSandbox

pytestmark = pytest.mark.e2e

PANDAS_CHECK = (
    "import pandas, numpy\n"
    "frame = pandas.DataFrame({'a': numpy.arange(4)})\n"
    "(int(frame.a.sum()), callable(pandas.read_csv), frame.a.dtype == numpy.int64)"
)


async def test_a_first_import_pandas_sent_at_once_is_complete(
    create_sandbox: CreateSandbox, stub: Stub
) -> None:
    sandbox = await create_sandbox()  # cold: the suite's controller has no pool
    first = await execute(stub, sandbox.name, "import pandas\npandas.__version__")
    assert not first.HasField("error"), first.error
    assert (first.stdout, first.stderr) == ("", "")  # nothing of the preload leaks into it
    version = value_of(first)
    assert version is not None and version.startswith("'") and "." in version
    assert first.execution_count == 1 and not first.namespace_reset
    assert value_of(await execute(stub, sandbox.name, PANDAS_CHECK)) == "(6, True, True)"
    # The preload stopped or ended: either way one interpreter, pandas imported once.
    again = await execute(stub, sandbox.name, "import pandas, sys\nsys.modules['pandas'] is pandas")
    assert value_of(again) == "True" and again.incarnation == first.incarnation
    # The pipe that stopped the preload is not user code's: beyond stdio, the worker holds the
    # protocol's two pipes only.
    hidden = (
        "import os\n"
        "links = []\n"
        "for fd in sorted(int(name) for name in os.listdir('/proc/self/fd'))[3:]:\n"
        "    try:\n"
        "        links.append(os.readlink(f'/proc/self/fd/{fd}'))\n"
        "    except OSError:\n"
        "        pass  # listdir's own, closed by now\n"
        "('PETRI_HURRY_FD' in os.environ, sum(link.startswith('pipe:') for link in links))"
    )
    assert value_of(await execute(stub, sandbox.name, hidden)) == "(False, 2)"


async def test_a_first_one_plus_one_sent_at_once_then_matplotlib(
    create_sandbox: CreateSandbox, stub: Stub
) -> None:
    sandbox = await create_sandbox()
    assert value_of(await execute(stub, sandbox.name, "1+1")) == "2"
    # Whatever the preload skipped is imported on demand, whole, with the font list the image
    # ships (no font scan warning on stderr).
    plotted = await execute(
        stub,
        sandbox.name,
        "import matplotlib.pyplot as plt\n"
        "plt.plot([1, 2])\n"
        "bool(plt.gcf().axes[0].get_xlim()[0] < 1)",
    )
    assert not plotted.HasField("error"), plotted.error
    assert "Matplotlib is building the font cache" not in plotted.stderr
    assert value_of(plotted) == "True"


@pytest.fixture(scope="module")
async def failing_preload(e2e_config: Config, controller: Controller) -> AsyncIterator[Stub]:
    config = sibling_config(
        e2e_config,
        controller,
        "preload",
        state_dir=e2e_config.state_dir / "preload",
        preload=("no_such_module_for_petri", "colorsys"),
    )
    running = await start_controller(config)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        yield sandbox_pb2_grpc.SandboxServiceStub(channel)
    await running.stop(grace=1)


async def test_a_preload_of_a_module_the_image_lacks_breaks_nothing(
    failing_preload: Stub,
) -> None:
    stub = failing_preload
    sandbox = await stub.CreateSandbox(sandbox_pb2.CreateSandboxRequest(parent=PARENT))
    try:
        first = await execute(stub, sandbox.name, "import colorsys\n1+1")
        assert value_of(first) == "2" and (first.stdout, first.stderr) == ("", "")
        missing = await execute(stub, sandbox.name, "import no_such_module_for_petri")
        assert missing.error.ename == "ModuleNotFoundError"  # a result, not an RPC error
        crashed = await execute(stub, sandbox.name, "import os\nos._exit(3)")
        assert crashed.error.ename
        # The next interpreter preloads in full (not hurried) and fails the same way, quietly.
        after = await execute(stub, sandbox.name, "import sys\n'colorsys' in sys.modules")
        assert value_of(after) == "True" and (after.stdout, after.stderr) == ("", "")
    finally:
        await stub.DeleteSandbox(sandbox_pb2.DeleteSandboxRequest(name=sandbox.name))
