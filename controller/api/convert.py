"""Conversions between the wire format (petri.v1 messages) and the controller's records."""

from datetime import UTC, datetime, timedelta

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from controller.errors import InvalidArgument
from controller.records import Resources, Runtime, SandboxRecord
from controller.sandboxes.hibernation import lost_names
from petri.v1 import sandbox_pb2


def timestamp(value: datetime) -> Timestamp:
    result = Timestamp()
    result.FromDatetime(value)
    return result


def to_datetime(value: Timestamp, field: str = "expire_time") -> datetime:
    try:
        return value.ToDatetime(tzinfo=UTC)
    except (OverflowError, ValueError) as exc:
        raise InvalidArgument(f"{field} is not a valid timestamp: {exc}") from exc


def to_timedelta(value: Duration, field: str) -> timedelta:
    if value.nanos and (value.seconds < 0) != (value.nanos < 0) and value.seconds:
        raise InvalidArgument(f"{field} is not a valid Duration (seconds and nanos differ in sign)")
    nanos = value.seconds * 10**9 + value.nanos
    # Rounded away from zero to microseconds: 1 ns must not become 0s ("never", "the default")
    # nor -1 ns pass as 0s.
    micros = nanos // 1000 if nanos < 0 else -(-nanos // 1000)
    try:
        return timedelta(microseconds=micros)
    except OverflowError as exc:
        raise InvalidArgument(f"{field} is out of range") from exc


def sandbox_to_proto(record: SandboxRecord) -> sandbox_pb2.Sandbox:
    resources = record.spec.resources
    sandbox = sandbox_pb2.Sandbox(
        name=record.name,
        uid=record.uid,
        display_name=record.display_name,
        labels=record.labels,
        spec=sandbox_pb2.SandboxSpec(
            language=sandbox_pb2.SandboxSpec.PYTHON,
            resources=sandbox_pb2.Resources(
                cpu_millis=resources.cpu_millis,
                memory_bytes=resources.memory_bytes,
                disk_bytes=resources.disk_bytes,
                max_processes=resources.max_processes,
            ),
            runtime=int(record.spec.runtime),  # type: ignore[arg-type]
            image_profile=record.spec.image_profile,
        ),
        state=int(record.state),  # type: ignore[arg-type]
        state_message=record.state_message,
        create_time=timestamp(record.create_time),
        update_time=timestamp(record.update_time),
        expire_time=timestamp(record.expire_time),
        last_active_time=timestamp(record.last_active_time),
        execution_count=record.execution_count,
        incarnation=record.incarnation,
    )
    sandbox.auto_pause_after.FromTimedelta(record.auto_pause_after)
    if record.checkpoint is not None:
        sandbox.checkpoint.create_time.CopyFrom(timestamp(record.checkpoint.create_time))
        sandbox.checkpoint.size_bytes = record.checkpoint.size_bytes
        sandbox.checkpoint.lost_names.extend(lost_names(record.checkpoint.lost))
    return sandbox


def auto_pause_after_from_proto(sandbox: sandbox_pb2.Sandbox) -> timedelta | None:
    if not sandbox.HasField("auto_pause_after"):
        return None
    return to_timedelta(sandbox.auto_pause_after, "auto_pause_after")


def resources_from_proto(resources: sandbox_pb2.Resources) -> Resources:
    return Resources(
        cpu_millis=resources.cpu_millis,
        memory_bytes=resources.memory_bytes,
        disk_bytes=resources.disk_bytes,
        max_processes=resources.max_processes,
    )


def runtime_from_proto(value: int) -> Runtime | None:
    if value == sandbox_pb2.SandboxSpec.RUNTIME_UNSPECIFIED:
        return None
    try:
        return Runtime(value)
    except ValueError:
        raise InvalidArgument(f"unknown spec.runtime {value}; use RUNC or GVISOR") from None


def expiration_from_proto(
    sandbox: sandbox_pb2.Sandbox,
) -> tuple[datetime | None, timedelta | None]:
    which = sandbox.WhichOneof("expiration")
    if which == "ttl":
        return None, to_timedelta(sandbox.ttl, "ttl")
    if which == "expire_time":
        return to_datetime(sandbox.expire_time), None
    return None, None
