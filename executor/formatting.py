"""Renders Python objects as MIME bundles, the way a notebook does.

Every bundle holds "text/plain". Rich renderings come from the IPython display protocol
(`_repr_html_`, `_repr_png_`, `_repr_mimebundle_`, ...). A rendering method that raises or returns
the wrong type is skipped, never fatal: the object is user code's and may do anything.
"""

import base64
import binascii
import io
import json
import reprlib
import sys
from collections.abc import Callable
from typing import Any

from petri.v1 import execution_pb2

# Caps the text/plain repr: a huge repr is almost never what a caller wants in a result.
MAX_REPR_CHARS = 1_000_000

_TEXT_METHODS = {
    "_repr_html_": "text/html",
    "_repr_markdown_": "text/markdown",
    "_repr_svg_": "image/svg+xml",
    "_repr_latex_": "text/latex",
}
_BINARY_METHODS = {
    "_repr_png_": "image/png",
    "_repr_jpeg_": "image/jpeg",
}
_BINARY_MIME_TYPES = frozenset(_BINARY_METHODS.values())


def is_figure(obj: Any) -> bool:
    """A matplotlib Figure (without importing matplotlib when the user did not)."""
    figure_module = sys.modules.get("matplotlib.figure")
    return figure_module is not None and isinstance(obj, figure_module.Figure)


def figure_png(figure: Any) -> bytes:
    buffer = io.BytesIO()
    # As IPython's inline backend: tight bounding box, the figure's own dpi.
    figure.savefig(buffer, format="png", bbox_inches="tight")
    return buffer.getvalue()


def to_output(obj: Any, kind: "execution_pb2.Output.Kind.ValueType") -> execution_pb2.Output:
    output = execution_pb2.Output(kind=kind)
    output.text["text/plain"] = plain_text(obj)
    if is_figure(obj):
        try:
            output.binary["image/png"] = figure_png(obj)
        except Exception:
            pass  # a figure that cannot draw itself still has its text/plain
    for method, mime in _TEXT_METHODS.items():
        value = _call_repr(obj, method)
        if isinstance(value, str):
            output.text[mime] = value
    json_value = _call_repr(obj, "_repr_json_")
    if json_value is not None:
        try:
            output.text["application/json"] = json.dumps(json_value)
        except (TypeError, ValueError):
            pass
    for method, mime in _BINARY_METHODS.items():
        data = _as_bytes(_call_repr(obj, method))
        if data is not None:
            output.binary[mime] = data
    _merge_mimebundle(output, _call_repr(obj, "_repr_mimebundle_"))
    return output


def bounded(output: execution_pb2.Output, limit: int) -> execution_pb2.Output:
    """Drops the largest renderings until the output fits in `limit` bytes; text/plain stays
    (cut if it must) and says what was dropped."""
    dropped = []
    while output.ByteSize() > limit:
        sizes = [(len(v), "binary", k) for k, v in output.binary.items()]
        sizes += [(len(v), "text", k) for k, v in output.text.items() if k != "text/plain"]
        if not sizes:
            break
        size, where, mime = max(sizes)
        del (output.binary if where == "binary" else output.text)[mime]
        dropped.append(f"{mime} ({size} bytes)")
    plain = output.text["text/plain"]
    if len(plain.encode()) > limit // 2:
        plain = plain[: limit // 8] + "... [truncated]"
    if dropped:
        plain += f"\n[petri: dropped {', '.join(dropped)}: over {limit} bytes]"
    output.text["text/plain"] = plain
    return output


def plain_text(obj: Any) -> str:
    try:
        text = repr(obj)
    except Exception as exc:  # a broken __repr__ is the object's problem, not ours
        text = f"<{type(obj).__name__} object (repr failed: {type(exc).__name__})>"
    if not isinstance(text, str):
        text = reprlib.repr(obj)
    if len(text) > MAX_REPR_CHARS:
        text = text[:MAX_REPR_CHARS] + f"... [repr truncated at {MAX_REPR_CHARS} characters]"
    return text


def _call_repr(obj: Any, method_name: str) -> Any:
    # Look the method up on the type, as IPython does: objects whose __getattr__ answers
    # every name must not pass for rich objects.
    method: Callable[..., Any] | None = getattr(type(obj), method_name, None)
    if not callable(method):
        return None
    try:
        return method(obj)
    except Exception:
        return None


def _as_bytes(value: Any) -> bytes | None:
    if isinstance(value, tuple) and value:  # (data, metadata)
        value = value[0]
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            return None
    return None


def _merge_mimebundle(output: execution_pb2.Output, bundle: Any) -> None:
    if isinstance(bundle, tuple) and bundle:  # (data, metadata)
        bundle = bundle[0]
    if not isinstance(bundle, dict):
        return
    for mime, value in bundle.items():
        if not isinstance(mime, str):
            continue
        if mime in _BINARY_MIME_TYPES:
            data = _as_bytes(value)
            if data is not None:
                output.binary[mime] = data
        elif isinstance(value, str):
            output.text[mime] = value
        elif mime == "application/json" or mime.endswith("+json"):
            try:
                output.text[mime] = json.dumps(value)
            except (TypeError, ValueError):
                pass
