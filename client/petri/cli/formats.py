"""Rendering the service's answers: tables (rich) or JSON."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message
from rich.console import Console
from rich.table import Table
from rich.text import Text

from petri.v1 import sandbox_pb2


def printable(text: str) -> str:
    """`text` with every control or format character (ESC, CR, NUL, bidi overrides...) written
    as its escape: names, labels and messages come from sandboxes and other users, and must
    not drive the user's terminal."""
    return "".join(
        c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text
    )


def cell(text: str) -> Text:
    """A table cell showing `text` as it is: printable, and never read as rich markup."""
    return Text(printable(text))


def human_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def human_time(moment: datetime | None) -> str:
    if moment is None:
        return "-"
    seconds = (moment - datetime.now(UTC)).total_seconds()
    span = abs(seconds)
    if span < 90:
        text = f"{span:.0f}s"
    elif span < 90 * 60:
        text = f"{span / 60:.0f}m"
    elif span < 48 * 3600:
        text = f"{span / 3600:.0f}h"
    else:
        text = f"{span / 86400:.0f}d"
    return f"in {text}" if seconds >= 0 else f"{text} ago"


def message_dict(message: Message) -> dict[str, Any]:
    """A proto message as JSON-ready data with the proto's own field names (stable keys)."""
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def print_json(document: object) -> None:
    json.dump(document, sys.stdout, indent=2, sort_keys=True, ensure_ascii=False)
    sys.stdout.write("\n")
    sys.stdout.flush()


def console() -> Console:
    # Wide when piped, so a table in a file or a pipe is not cut at 80 columns.
    return Console(soft_wrap=False, width=None if sys.stdout.isatty() else 200)


def _timestamp(message: Message, field: str) -> datetime | None:
    if not message.HasField(field):
        return None
    value: datetime = getattr(message, field).ToDatetime(tzinfo=UTC)
    return value


def state_name(info: sandbox_pb2.Sandbox) -> str:
    return sandbox_pb2.Sandbox.State.Name(info.state)


def sandbox_table(sandboxes: Iterable[sandbox_pb2.Sandbox]) -> Table:
    table = Table(box=None, pad_edge=False)
    for column in ("NAME", "STATE", "PROFILE", "RUNTIME", "CREATED", "EXPIRES", "EXECS", "LABELS"):
        table.add_column(column, overflow="fold")
    for info in sandboxes:
        row = (
            info.name.rsplit("/", 1)[-1],
            state_name(info),
            info.spec.image_profile or "-",
            sandbox_pb2.SandboxSpec.Runtime.Name(info.spec.runtime).lower(),
            human_time(_timestamp(info, "create_time")),
            human_time(_timestamp(info, "expire_time")),
            str(info.execution_count),
            labels_text(info.labels),
        )
        table.add_row(*(cell(value) for value in row))
    return table


def labels_text(labels: Mapping[str, str]) -> str:
    return ",".join(f"{key}={value}" for key, value in sorted(labels.items())) or "-"


def sandbox_details(info: sandbox_pb2.Sandbox) -> Table:
    table = Table(box=None, show_header=False, pad_edge=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    resources = info.spec.resources
    rows = [
        ("name", info.name),
        ("state", state_name(info) + (f" ({info.state_message})" if info.state_message else "")),
        ("display name", info.display_name or "-"),
        ("profile", info.spec.image_profile or "-"),
        ("runtime", sandbox_pb2.SandboxSpec.Runtime.Name(info.spec.runtime).lower()),
        ("cpu", f"{resources.cpu_millis / 1000:g} cores" if resources.cpu_millis else "-"),
        ("memory", human_size(resources.memory_bytes) if resources.memory_bytes else "-"),
        ("disk", human_size(resources.disk_bytes) if resources.disk_bytes else "-"),
        ("processes", str(resources.max_processes or "-")),
        ("labels", labels_text(info.labels)),
        ("created", human_time(_timestamp(info, "create_time"))),
        ("expires", human_time(_timestamp(info, "expire_time"))),
        ("last active", human_time(_timestamp(info, "last_active_time"))),
        ("executions", str(info.execution_count)),
        ("incarnation", info.incarnation or "-"),
    ]
    if info.HasField("checkpoint"):
        checkpoint = info.checkpoint
        saved = human_time(_timestamp(checkpoint, "create_time"))
        rows.append(("checkpoint", f"{human_size(checkpoint.size_bytes)}, saved {saved}"))
    for key, value in rows:
        table.add_row(key, cell(value))
    return table
