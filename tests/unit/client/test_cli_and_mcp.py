"""The CLI's and the MCP server's pure parts: value parsing, NAME:path, exit codes, and how
executions and files become tool results. No service: the e2e tests cover the rest."""

from __future__ import annotations

import base64
import subprocess
import sys

import grpc
import pytest
from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import ImageContent, TextContent

from petri.cli.app import build_parser
from petri.cli.commands import _progress, _split_remote, summarize
from petri.cli.errors import CliError, Exit, exit_code_of, one_line
from petri.cli.values import parse_duration, parse_labels, parse_size
from petri.mcp import server
from petri.mcp.sessions import session_label
from petri.mcp.tools import _Capped, _file_content, _TooBig, render_execution
from petri.sdk.errors import error_from_status
from petri.sdk.execution import Execution, ExecutionError, Result

PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 16


def test_values() -> None:
    assert [parse_duration(t) for t in ("90", "90s", "30m", "2h", "1d", "500ms")] == [
        90,
        90,
        1800,
        7200,
        86400,
        0.5,
    ]
    assert [parse_size(t) for t in ("4096", "512M", "1.5G", "2GiB", "1k")] == [
        4096,
        512 << 20,
        3 << 29,
        2 << 30,
        1024,
    ]
    assert parse_labels(["a=1", "b=x=y", "c="]) == {"a": "1", "b": "x=y", "c": ""}
    for bad in (
        lambda: parse_duration("soon"),
        lambda: parse_size("big"),
        lambda: parse_labels(["x"]),
    ):
        with pytest.raises(CliError):
            bad()


def test_remote_paths() -> None:
    assert _split_remote("box:dir/f.txt") == ("box", "dir/f.txt")
    assert _split_remote("projects/p/sandboxes/box:f") == ("projects/p/sandboxes/box", "f")
    assert _split_remote("box:") == ("box", "")
    for local in ("./box:f", "/tmp/a:b", "data.csv", "-", "Box:f", "C:/x"):
        assert _split_remote(local) is None, local


def test_exit_codes_and_one_line_messages() -> None:
    assert exit_code_of(error_from_status(grpc.StatusCode.NOT_FOUND, "gone")) == Exit.NOT_FOUND
    assert exit_code_of(error_from_status(grpc.StatusCode.UNAVAILABLE, "x")) == Exit.UNAVAILABLE
    assert exit_code_of(error_from_status(grpc.StatusCode.INTERNAL, "x")) == Exit.SERVER
    assert len({int(e) for e in Exit}) == len(Exit)  # one code per class
    assert one_line("a\nb\r\n  c") == "a b c"
    assert len(one_line("x" * 10_000)) == 2000


def test_http_refuses_a_remote_host_without_allow_remote() -> None:
    with pytest.raises(SystemExit) as exit_:
        server.main(["--transport", "http", "--host", "0.0.0.0"])
    assert exit_.value.code == 2


def test_session_labels_follow_label_rules() -> None:
    assert session_label(None) == "stdio"
    assert session_label("AB/../" + "f" * 100) == "ab----" + "f" * 57


def test_render_execution() -> None:
    figure = Result(kind="display", data={"text/plain": "<Figure>", "image/png": PNG})
    value = Result(kind="result", data={"text/plain": "42"})
    ok = render_execution(Execution(stdout="hi\n", results=[figure, value]))
    assert not ok.is_error
    [text, image] = ok.content
    assert isinstance(text, TextContent) and isinstance(image, ImageContent)
    assert "stdout:\nhi" in text.text and "result:\n42" in text.text
    assert base64.b64decode(image.data) == PNG and image.mime_type == "image/png"

    error = ExecutionError("exception", "ValueError", "bad", ["Traceback...\n", "ValueError: bad"])
    failed = render_execution(Execution(error=error, namespace_reset=True))
    assert failed.is_error
    [text] = failed.content
    assert isinstance(text, TextContent)
    assert (
        "error: ValueError: bad\nTraceback..." in text.text and "variables were lost" in text.text
    )
    assert render_execution(Execution()).content[0] == TextContent(type="text", text="(no output)")


def test_file_content_by_kind() -> None:
    [text] = _file_content("a.txt", "text/plain", "héllo".encode()).content
    assert text == TextContent(type="text", text="héllo")
    [_, image] = _file_content("p.png", "image/png", PNG).content
    assert isinstance(image, ImageContent) and base64.b64decode(image.data) == PNG
    [blob] = _file_content("b.bin", "application/octet-stream", b"\0\xff").content
    assert isinstance(blob, TextContent) and blob.text.endswith(
        base64.b64encode(b"\0\xff").decode()
    )
    with pytest.raises(ToolError, match="run_python"):
        _file_content("big.bin", "", b"\xff" * (300 << 10))
    sink = _Capped(4)
    sink.write(b"abcd")
    with pytest.raises(_TooBig):
        sink.write(b"e")


def test_connection_options_before_or_after_the_command() -> None:
    parser = build_parser()
    before = parser.parse_args(["--addr", "h:1", "--json", "ls"])
    after = parser.parse_args(["ls", "--addr", "h:1", "--json"])
    neither = parser.parse_args(["ls"])
    assert (before.addr, before.json) == (after.addr, after.json) == ("h:1", True)
    assert (neither.addr, neither.json, neither.token) == (None, False, None)
    both = parser.parse_args(["--project", "a", "get", "--project", "b", "x"])
    assert both.project == "b"


def test_terminal_summaries() -> None:
    figure = Result(kind="display", data={"text/plain": "<Figure>", "image/png": b"x" * 2048})
    assert summarize(figure) == "[image/png 2.0 KB]"
    frame = Result(kind="result", data={"text/plain": "   a\n0  1", "text/html": "<table/>"})
    assert summarize(frame) == "   a\n0  1"
    assert summarize(Result(kind="display", data={"text/html": "<b/>"})) == "[text/html 4 B]"


def test_progress_bar_only_on_a_terminal(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    with _progress("copy", 8 << 20, quiet=False) as advance:
        advance(8 << 20)
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    with _progress("copy", 8 << 20, quiet=False) as advance:
        advance(4 << 20)
        advance(4 << 20)
    with _progress("download", None, quiet=False) as advance:  # size unknown
        advance(1 << 20)


@pytest.mark.parametrize(("argv", "extra"), [(["ls"], "cli"), (["mcp", "--help"], "mcp")])
def test_the_command_without_its_extra_says_what_to_install(argv: list[str], extra: str) -> None:
    # `pip install petri-client` installs `petri` without rich or mcp: a hint, not a traceback.
    # A None in sys.modules makes importing that module fail as if it were not installed; only
    # the extra the command needs is missing (`petri mcp` must not need the cli's rich).
    module = "rich" if extra == "cli" else "mcp"
    code = (
        f"import sys, importlib.util; sys.modules[{module!r}] = None; "
        "real = importlib.util.find_spec; "
        f"importlib.util.find_spec = lambda n, *a: None if n == {module!r} else real(n, *a); "
        f"from petri.cli import main; sys.exit(main({argv!r}))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert f"pip install 'petri-client[{extra}]'" in done.stderr, done.stderr
