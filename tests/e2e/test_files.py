"""Files in and out, streaming, rich results: through the real API into real sandboxes."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import grpc
import pytest

from petri.v1 import execution_pb2, sandbox_pb2
from tests.e2e.helpers import execute, value_of

if TYPE_CHECKING:
    from petri.v1.sandbox_pb2_grpc import SandboxServiceAsyncStub as Stub

pytestmark = pytest.mark.e2e
MiB = 1 << 20
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def start(name: str, code: str, timeout: int = 120) -> sandbox_pb2.StreamExecuteCodeRequest:
    message = sandbox_pb2.StreamExecuteCodeRequest(
        start=sandbox_pb2.ExecuteCodeStart(name=name, code=code)
    )
    message.start.timeout.FromSeconds(timeout)
    return message


async def requests_for(
    name: str, code: str, files: dict[str, bytes]
) -> AsyncIterator[sandbox_pb2.StreamExecuteCodeRequest]:
    yield start(name, code)
    for path, data in files.items():
        chunks = [data[i : i + MiB] for i in range(0, len(data), MiB)] or [b""]
        for index, piece in enumerate(chunks):
            yield sandbox_pb2.StreamExecuteCodeRequest(
                input_chunk=execution_pb2.FileChunk(
                    path=path, data=piece, final=index == len(chunks) - 1
                )
            )


class Streamed:
    def __init__(self) -> None:
        self.stdout: list[tuple[float, str]] = []
        self.files: dict[str, bytearray] = {}
        self.first_chunks: dict[str, execution_pb2.FileChunk] = {}
        self.result: sandbox_pb2.ExecuteCodeResult | None = None
        self.result_time = 0.0


async def stream(
    stub: Stub, requests: AsyncIterator[sandbox_pb2.StreamExecuteCodeRequest]
) -> Streamed:
    out = Streamed()
    async for response in stub.StreamExecuteCode(requests):
        now = time.monotonic()
        which = response.WhichOneof("event")
        if which == "stdout":
            out.stdout.append((now, response.stdout))
        elif which == "output_chunk":
            chunk = response.output_chunk
            if chunk.path not in out.files:
                out.first_chunks[chunk.path] = chunk
            out.files.setdefault(chunk.path, bytearray()).extend(chunk.data)
        elif which == "result":
            out.result, out.result_time = response.result, now
    return out


async def listing(stub: Stub, name: str) -> str | None:
    return value_of(await execute(stub, name, "import os\nsorted(os.listdir('/workspace'))"))


async def test_a_100_mib_file_goes_in_and_out_intact(
    stub: Stub, sandbox: sandbox_pb2.Sandbox
) -> None:
    data = os.urandom(100 * MiB)
    code = "import shutil\nshutil.copyfile('big.bin', 'copy.bin')"
    out = await stream(stub, requests_for(sandbox.name, code, {"big.bin": data}))
    assert out.result is not None and not out.result.HasField("error"), out.result
    assert list(out.files) == ["copy.bin"]  # the input came back only as the copy
    assert hashlib.sha256(out.files["copy.bin"]).digest() == hashlib.sha256(data).digest()
    first = out.first_chunks["copy.bin"]
    assert (first.size, first.mime_type) == (100 * MiB, "application/octet-stream")


async def test_more_than_100_mib_is_refused_and_nothing_is_written(
    stub: Stub, sandbox: sandbox_pb2.Sandbox
) -> None:
    files = {"small.txt": b"fits", "huge.bin": os.urandom(101 * MiB)}
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stream(stub, requests_for(sandbox.name, "print('never runs')", files))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "nothing was written" in (caught.value.details() or "")

    unary = sandbox_pb2.ExecuteCodeRequest(
        name=sandbox.name,
        code="print('never runs')",
        files=[execution_pb2.File(path=p, content=c) for p, c in files.items()],
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ExecuteCode(unary)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert await listing(stub, sandbox.name) == "[]"  # no file, no staging leftovers


async def test_csv_in_chart_and_csv_out(stub: Stub, sandbox: sandbox_pb2.Sandbox) -> None:
    csv = b"city,temp\nOslo,4\nRome,18\nCairo,30\n"
    code = (
        "import pandas as pd\n"
        "df = pd.read_csv('in/weather.csv')\n"
        "ax = df.plot.bar(x='city', y='temp')\n"
        "ax.figure.savefig('out/chart.png')\n"
        "df.assign(hot=df.temp > 15).to_csv('out/weather_hot.csv', index=False)\n"
    )
    response = await execute(
        stub,
        sandbox.name,
        "import os; os.makedirs('out', exist_ok=True)\n" + code,
        files=[execution_pb2.File(path="in/weather.csv", content=csv)],
    )
    assert not response.HasField("error"), response.error
    files = {f.path: f for f in response.files}
    assert sorted(files) == ["out/chart.png", "out/weather_hot.csv"]
    chart = files["out/chart.png"]
    assert chart.content.startswith(PNG_SIGNATURE)
    assert (chart.mime_type, chart.size) == ("image/png", len(chart.content))
    assert files["out/weather_hot.csv"].mime_type == "text/csv"
    assert files["out/weather_hot.csv"].content.splitlines()[1] == b"Oslo,4,False"
    # The figure was left open, so it is also shown like a notebook would, then closed.
    figures = [o for o in response.outputs if "image/png" in o.binary]
    assert len(figures) == 1 and figures[0].binary["image/png"].startswith(PNG_SIGNATURE)
    again = await execute(stub, sandbox.name, "import matplotlib.pyplot as plt\nplt.get_fignums()")
    assert value_of(again) == "[]"


async def test_a_dataframe_value_has_html_and_plain_text(
    stub: Stub, sandbox: sandbox_pb2.Sandbox
) -> None:
    response = await execute(
        stub, sandbox.name, "import pandas as pd\npd.DataFrame({'a': [1, 2], 'b': ['x', 'y']})"
    )
    (output,) = response.outputs
    assert output.kind == execution_pb2.Output.RESULT
    assert "<table" in output.text["text/html"]
    assert output.text["text/plain"].split() == ["a", "b", "0", "1", "x", "1", "2", "y"]


async def test_display_and_repr_methods(stub: Stub, sandbox: sandbox_pb2.Sandbox) -> None:
    code = (
        "class Chart:\n"
        "    def _repr_svg_(self): return '<svg/>'\n"
        "    def _repr_json_(self): return {'n': 1}\n"
        "display(Chart())\n"
        "'done'"
    )
    response = await execute(stub, sandbox.name, code)
    shown, _ = response.outputs
    assert shown.kind == execution_pb2.Output.DISPLAY
    assert shown.text["image/svg+xml"] == "<svg/>"
    assert shown.text["application/json"] == '{"n": 1}'
    assert "text/plain" in shown.text
    assert value_of(response) == "'done'"


async def test_stdout_streams_while_the_code_runs(stub: Stub, sandbox: sandbox_pb2.Sandbox) -> None:
    code = "import time\nfor i in range(4):\n    print(f'tick {i}')\n    time.sleep(1)"
    out = await stream(stub, requests_for(sandbox.name, code, {}))
    assert "".join(text for _, text in out.stdout) == "tick 0\ntick 1\ntick 2\ntick 3\n"
    first_arrival = out.stdout[0][0]
    # The code sleeps 4 s after its first print: the first line must have arrived long before
    # the end, not with it.
    assert out.result_time - first_arrival > 2.5


@pytest.mark.parametrize(
    ("path", "fragment"),
    [
        ("/etc/passwd", "is absolute"),
        ("../escape.txt", "contains '..'"),
        ("a/../../escape.txt", "contains '..'"),
        ("", "empty"),
        ("a\0b", "NUL"),
        ("a//b", "empty or '.'"),
    ],
)
async def test_bad_input_paths_are_refused_and_nothing_is_written(
    stub: Stub, sandbox: sandbox_pb2.Sandbox, path: str, fragment: str
) -> None:
    request = sandbox_pb2.ExecuteCodeRequest(
        name=sandbox.name,
        code="print('never runs')",
        files=[
            execution_pb2.File(path="fine.txt", content=b"ok"),
            execution_pb2.File(path=path, content=b"x"),
        ],
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ExecuteCode(request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in (caught.value.details() or "")
    assert await listing(stub, sandbox.name) == "[]"


async def test_a_path_through_a_symlink_is_refused_and_nothing_is_written(
    stub: Stub, sandbox: sandbox_pb2.Sandbox
) -> None:
    await execute(stub, sandbox.name, "import os\nos.symlink('/tmp', 'link')")
    for code_path in ("link/evil.txt", "link"):
        files = {"fine.txt": b"ok", code_path: b"x"}
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stream(stub, requests_for(sandbox.name, "print('never runs')", files))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "symlink" in (caught.value.details() or "")
    written = "sorted({'fine.txt', 'evil.txt', 'link'} & set(os.listdir('/tmp')))"
    check = await execute(stub, sandbox.name, f"import os\n(sorted(os.listdir('.')), {written})")
    assert value_of(check) == "(['link'], [])"


async def test_symlinks_made_by_code_are_not_followed_when_collecting(
    stub: Stub, sandbox: sandbox_pb2.Sandbox
) -> None:
    response = await execute(
        stub,
        sandbox.name,
        "import os\n"
        "os.symlink('/etc/passwd', 'passwd')\n"
        "os.symlink('/usr/lib', 'lib')\n"
        "os.mkfifo('pipe')\n"
        "open('real.txt', 'w').write('mine')",
    )
    assert [(f.path, f.content) for f in response.files] == [("real.txt", b"mine")]


async def test_unchanged_inputs_do_not_come_back_but_changed_ones_do(
    stub: Stub, sandbox: sandbox_pb2.Sandbox
) -> None:
    response = await execute(
        stub,
        sandbox.name,
        "open('edit.txt', 'a').write(' more')",
        files=[
            execution_pb2.File(path="keep.txt", content=b"as sent"),
            execution_pb2.File(path="edit.txt", content=b"base"),
        ],
    )
    assert [(f.path, f.content) for f in response.files] == [("edit.txt", b"base more")]
    later = await execute(stub, sandbox.name, "open('keep.txt').read()")
    assert value_of(later) == "'as sent'" and not later.files


async def test_stdout_over_the_cap_is_truncated_with_a_marker(
    stub: Stub, sandbox: sandbox_pb2.Sandbox
) -> None:
    response = await execute(
        stub, sandbox.name, "import sys\nfor _ in range(12):\n    sys.stdout.write('x' * (1 << 20))"
    )
    assert response.output_truncated
    assert response.stdout.endswith("[petri: output truncated: stdout exceeded 10485760 bytes]\n")
    assert len(response.stdout) < 10 * MiB + 200
    assert value_of(await execute(stub, sandbox.name, "'still fine'")) == "'still fine'"


DEEP_CHAIN = (
    "import os\n"
    "fd = os.open('/workspace', os.O_RDONLY)\n"
    "for _ in range(1500):\n"
    "    os.mkdir('d', dir_fd=fd)\n"
    "    fd, old = os.open('d', os.O_RDONLY, dir_fd=fd), fd\n"
    "    os.close(old)\n"
    "os.close(fd)\n"
)


async def test_a_directory_chain_too_deep_to_scan_is_reported_and_the_sandbox_keeps_working(
    stub: Stub, sandbox: sandbox_pb2.Sandbox
) -> None:
    made = await execute(
        stub, sandbox.name, DEEP_CHAIN + "open('d/d/near.txt', 'w').write('n')\nprint('made')"
    )
    assert made.stdout == "made\n" and not made.HasField("error"), made.error
    assert [(f.path, f.content) for f in made.files] == [("d/d/near.txt", b"n")]
    deep = "/".join(["d"] * 64)
    assert [(o.path, o.reason) for o in made.omitted_files] == [
        (deep, "deeper than 64 levels: not scanned")
    ]
    later = await execute(stub, sandbox.name, "1 + 1")
    assert value_of(later) == "2"
    removed = await execute(
        stub, sandbox.name, "import subprocess\nsubprocess.run(['rm', '-rf', 'd']).returncode"
    )
    assert value_of(removed) == "0" and not removed.omitted_files
    assert await listing(stub, sandbox.name) == "[]"


async def test_a_file_name_that_is_not_utf8_is_omitted_and_the_result_arrives(
    stub: Stub, sandbox: sandbox_pb2.Sandbox
) -> None:
    code = "open(b'/workspace/caf\\xe9.txt', 'wb').write(b'x')\nprint('written')"
    streamed = await stream(stub, requests_for(sandbox.name, code, {}))
    assert "".join(text for _, text in streamed.stdout) == "written\n"
    assert streamed.result is not None and not streamed.files
    assert [(o.path, o.size, o.reason) for o in streamed.result.omitted_files] == [
        ("caf\\xe9.txt", 1, "its name is not valid UTF-8: not returned (rename it to return it)")
    ]
    later = await execute(stub, sandbox.name, "import os\nos.listdir(b'.')")
    assert value_of(later) == "[b'caf\\xe9.txt']" and not later.omitted_files
    renamed = await execute(stub, sandbox.name, "os.rename(b'caf\\xe9.txt', 'cafe.txt')")
    assert [(f.path, f.content) for f in renamed.files] == [("cafe.txt", b"x")]


async def test_files_beyond_the_listed_omitted_entries_are_counted_exactly(
    stub: Stub, sandbox: sandbox_pb2.Sandbox
) -> None:
    # 3,000 files, 1,000 returned (the default max_output_files): 2,000 omitted, of which the
    # executor lists 1,000 and counts the other 1,000 in its summary entry.
    code = "for i in range(3000):\n    open(f'{i:04}.txt', 'w').write('x')\nprint('made')"
    made = await execute(stub, sandbox.name, code)
    assert made.stdout == "made\n" and not made.HasField("error"), made.error
    assert len(made.files) == 1000
    *listed, summary = made.omitted_files
    assert len(listed) == 1000 and all(o.path and o.size == 1 for o in listed)
    assert (summary.path, summary.size) == ("", 1000)
    assert summary.reason == "1000 more omitted entries are not listed"
    returned = {f.path for f in made.files} | {o.path for o in listed}
    assert len(returned) == 2000
