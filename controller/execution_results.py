"""Collects an execution's event stream into one ExecuteCodeResponse, within the output caps.

The executor is as hostile as the code it runs: whatever it sends, the response stays within
`max_output_bytes` of stdout and of stderr, and the caller is told when output was cut.
"""

from petri.v1 import executor_pb2, sandbox_pb2

TRUNCATION_MARKER = "\n[petri: output truncated: {stream} exceeded {limit} bytes]\n"


class _CappedText:
    def __init__(self, name: str, limit: int) -> None:
        self._name = name
        self._limit = limit
        self._parts: list[str] = []
        self._size = 0
        self.truncated = False

    def add(self, text: str) -> None:
        if self.truncated:
            return
        data = text.encode()
        room = self._limit - self._size
        if len(data) <= room:
            self._parts.append(text)
            self._size += len(data)
            return
        self._parts.append(data[:room].decode(errors="ignore"))
        self._parts.append(TRUNCATION_MARKER.format(stream=self._name, limit=self._limit))
        self._size = self._limit
        self.truncated = True

    def text(self) -> str:
        return "".join(self._parts)


class ResponseCollector:
    def __init__(self, max_output_bytes: int) -> None:
        self._stdout = _CappedText("stdout", max_output_bytes)
        self._stderr = _CappedText("stderr", max_output_bytes)
        self._response = sandbox_pb2.ExecuteCodeResponse()
        self._outputs_bytes = 0
        self._max_outputs_bytes = max_output_bytes
        self.finished = False

    def add(self, event: executor_pb2.ExecuteEvent) -> None:
        which = event.WhichOneof("event")
        if which == "stdout":
            self._stdout.add(event.stdout)
        elif which == "stderr":
            self._stderr.add(event.stderr)
        elif which == "output":
            size = event.output.ByteSize()
            if self._outputs_bytes + size > self._max_outputs_bytes:
                self._response.output_truncated = True
                return
            self._outputs_bytes += size
            self._response.outputs.append(event.output)
        elif which == "result":
            result = event.result
            if result.HasField("error"):
                self._response.error.CopyFrom(result.error)
            self._response.execution_count = result.execution_count
            self._response.duration.CopyFrom(result.duration)
            self._response.incarnation = result.incarnation
            self._response.namespace_reset = result.namespace_reset
            self.finished = True

    def response(self) -> sandbox_pb2.ExecuteCodeResponse:
        self._response.stdout = self._stdout.text()
        self._response.stderr = self._stderr.text()
        if self._stdout.truncated or self._stderr.truncated:
            self._response.output_truncated = True
        return self._response
