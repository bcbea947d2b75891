"""What the CLI prints from a sandbox or another user (names, labels, messages, file paths)
never drives the terminal: control characters are escaped, rich markup is shown as text."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from petri.cli.commands import _notes
from petri.cli.errors import report
from petri.cli.formats import printable, sandbox_details, sandbox_table
from petri.sdk.execution import Execution, OmittedFile, OutputFile
from petri.v1 import sandbox_pb2

HOSTILE = "a\x1b]0;owned\x07b\x1b[2Jc\rd\u202ee[bold red]MARK[/]"


def _rendered(renderable: object) -> str:
    out = io.StringIO()
    Console(file=out, force_terminal=True, width=400, soft_wrap=False).print(renderable)
    return out.getvalue()


def _assert_inert(text: str) -> None:
    assert "\x1b]" not in text and "\x1b[2J" not in text
    assert "\r" not in text and "\u202e" not in text and "\x07" not in text
    assert "\\x1b[2J" in text


def test_printable_escapes_control_and_format_characters() -> None:
    assert printable("plain text, ünïcode") == "plain text, ünïcode"
    assert printable("a\x1bb\nc\x00d\u202e") == "a\\x1bb\\nc\\x00d\\u202e"


def test_tables_show_hostile_fields_as_text() -> None:
    info = sandbox_pb2.Sandbox(
        name="projects/p/sandboxes/x",
        display_name=HOSTILE,
        state_message=HOSTILE,
        labels={"team": HOSTILE},
    )
    for table in (sandbox_details(info), sandbox_table([info])):
        text = _rendered(table)
        _assert_inert(text)
        assert "[bold red]MARK[/]" in text  # markup shown, not applied


def test_notes_and_errors_escape_sandbox_paths(capsys: pytest.CaptureFixture[str]) -> None:
    execution = Execution(
        files=[OutputFile(path=HOSTILE, content=b"x", mime_type="text/plain")],
        omitted_files=[OmittedFile(path=HOSTILE, size=1, reason=HOSTILE)],
    )
    _notes(execution, {})
    report(f"no such file {HOSTILE}")
    _assert_inert(capsys.readouterr().err)
