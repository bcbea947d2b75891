"""The controller's configuration: one object, from flags and PETRI_* environment variables.

A flag wins over its environment variable, which wins over the default. Every option is listed
by `python -m controller --help`, with its variable.
"""

import argparse
import os
import re
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from controller.pool_targets import PoolTarget, parse_pool
from controller.units import format_duration, parse_duration, parse_size

# The first uid user code may run as in a sandbox (controller.sandboxes.worker_uids): below
# it, the image's system accounts, and room for them.
WORKER_UID_FIRST = 10000


def _default_state_dir() -> Path:
    data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data_home) / "petri"


def _default_runtime_dir() -> Path:
    # Sockets want a short path (108 bytes at most) and a tmpfs that a reboot clears.
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    return Path(runtime) / "petri" if runtime else _default_state_dir() / "run"


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"invalid boolean {text!r}: use true or false")


_MODULE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def _parse_modules(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    for name in names:
        if _MODULE.fullmatch(name) is None:
            raise ValueError(f"{name!r} is not a module name")
    return names


def parse_host_port(text: str) -> tuple[str, int]:
    """HOST:PORT, an IPv6 host in brackets → (host, port); ValueError when it is not one."""
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{text[:100]!r} is not HOST:PORT, e.g. 127.0.0.1:9464")
    return host, int(port)


def _parse_listen_or_off(text: str) -> str:
    text = text.strip()
    if text:
        parse_host_port(text)
    return text


def parse_database_url(text: str) -> str:
    text = text.strip()
    if text and not text.startswith(("postgresql://", "postgres://")):
        # Not echoed: it may hold a password.
        raise ValueError("must be empty (SQLite) or a postgresql:// URL")
    return text


ROLES = ("single", "node", "gateway")
# A node's name: a DNS subdomain (RFC 1123), as Kubernetes names its nodes
# ("ip-10-0-0-1.ec2.internal": the deploy manifests pass spec.nodeName).
_NODE_LABEL = r"[a-z0-9]([a-z0-9-]*[a-z0-9])?"
_NODE_NAME = re.compile(rf"{_NODE_LABEL}(\.{_NODE_LABEL})*")
MAX_NODE_NAME = 253


def _parse_role(text: str) -> str:
    text = text.strip().lower()
    if text not in ROLES:
        raise ValueError(f"{text[:40]!r} is no role: use single, node or gateway")
    return text


def _parse_node_name(text: str) -> str:
    text = text.strip()
    if len(text) > MAX_NODE_NAME or _NODE_NAME.fullmatch(text) is None:
        raise ValueError(
            f"{text[:80]!r} is not a node name: a DNS name (lowercase letters, digits, '-' "
            f"and '.', each part starting and ending with a letter or digit), at most "
            f"{MAX_NODE_NAME} characters"
        )
    return text


def _default_node_name() -> str:
    """The host's name as a node name: lowercased, its first label, anything else as '-'."""
    host = socket.gethostname().split(".")[0].lower()
    return re.sub(r"[^a-z0-9-]", "-", host)[:63].strip("-") or "node"


# A URL's user part password: from the first ':' after "//" to the last '@', so that one with
# an unescaped '/', '?', '#' or '@' (which a URL parser cuts short) is masked whole.
_URL_PASSWORD = re.compile(r"^(?P<head>[^:/?#]+://[^:@/?#]*:)(?P<secret>.*)@", re.DOTALL)
# A password parameter of a URL's query (its name may be percent-encoded).
_URL_PARAMETER = re.compile(r"(?P<head>[?&](?P<key>[^=&#]*)=)(?P<secret>[^&]*)")
# A password of libpq's key=value form.
_KEYWORD_PASSWORD = re.compile(r"(?P<head>password\s*=\s*)(?P<secret>'[^']*'|\S+)", re.I)


def _passwords(url: str) -> list[tuple[int, int, str, str]]:
    """The passwords in a database URL or libpq's key=value string: where they are (the span
    to replace), what shows in their place, and the password as written."""
    if "://" not in url:
        return [(*m.span("secret"), "***", m["secret"]) for m in _KEYWORD_PASSWORD.finditer(url)]
    found = []
    user = _URL_PASSWORD.match(url)
    if user is not None:
        found.append((*user.span("secret"), "***", user["secret"]))
    for param in _URL_PARAMETER.finditer(url, user.end() if user else 0):
        if unquote(param["key"]).lower() == "password":
            found.append((param.start("key"), param.end(), "password=***", param["secret"]))
    return found


def url_passwords(url: str) -> list[str]:
    """The passwords in a database URL, as written and decoded, and the pieces of one with an
    unescaped '@' or '/' (libpq takes what follows for the host or the database, and its
    messages name them): what no message may show."""
    written = [password for *_, password in _passwords(url)]
    pieces = [piece for password in written for piece in re.split(r"[@/]", password)]
    secrets = {secret for raw in written + pieces if raw for secret in (raw, unquote(raw))}
    return sorted(secrets, key=len, reverse=True)  # a password goes before any part of it


def redact_url(url: str) -> str:
    """A database URL (or libpq's key=value string) as it may be shown: any password in it
    (the user part's, or a password parameter) replaced by ***."""
    for start, end, shown, _ in reversed(_passwords(url)):
        url = f"{url[:start]}{shown}{url[end:]}"
    return url


def _opt(help: str, parse: Callable[[str], Any] = str, **kwargs: Any) -> Any:
    return field(metadata={"help": help, "parse": parse}, **kwargs)


@dataclass(frozen=True)
class Config:
    listen: str = _opt("address the gRPC API listens on", default="127.0.0.1:50051")
    state_dir: Path = _opt("where the registry lives", Path, default_factory=_default_state_dir)
    database: Path | None = _opt(
        "SQLite registry file (default STATE_DIR/petri.db)", Path, default=None
    )
    database_url: str = _opt(
        "the registry in PostgreSQL, shared by controllers: postgresql://USER@HOST/DB (libpq's "
        "URL, e.g. postgresql:///petri?host=/run/pg for a unix socket); empty: SQLite at "
        "DATABASE. Give a password in PGPASSFILE or this variable, not the flag (ps shows flags)",
        parse_database_url,
        default="",
        repr=False,  # a password must not reach a log through a repr
    )
    role: str = _opt(
        "single: one controller with its own registry (the default); node: one of several "
        "controllers, one per host, sharing the registry in PostgreSQL (--database-url) behind "
        "gateways; gateway: a stateless front that places sandboxes on the nodes",
        _parse_role,
        default="single",
    )
    node_name: str = _opt(
        "this node's name among the nodes sharing the registry (role node): a DNS name "
        "(lowercase letters, digits, '-', '.'), at most 253; default: the host's name",
        _parse_node_name,
        default_factory=_default_node_name,
    )
    node_address: str = _opt(
        "HOST:PORT at which the gateways reach this node's gRPC API (role node); default: "
        "the listen address",
        _parse_listen_or_off,
        default="",
    )
    heartbeat_interval: timedelta = _opt(
        "how often a node tells the registry it is alive, with its figures (role node)",
        parse_duration,
        default=timedelta(seconds=2),
    )
    node_timeout: timedelta = _opt(
        "a node whose last heartbeat is older than this is dead: the other nodes mark its "
        "sandboxes TERMINATED and gateways place nothing on it",
        parse_duration,
        default=timedelta(seconds=10),
    )
    node_keepalive: timedelta = _opt(
        "how often a gateway (or a node moving a sandbox) pings each node it is connected to, "
        "and how long it waits for the answer: a node that froze (stopped, hung, cut off "
        "without a reset) fails the calls in flight to it within twice this. Nodes accept "
        "pings as often as every half of theirs (their callers' pings too): set it alike on "
        "gateways and nodes",
        parse_duration,
        default=timedelta(seconds=10),
    )
    max_sandboxes_per_node: int = _opt(
        "most sandboxes this node holds, for the gateways' placement (0: no limit)",
        int,
        default=0,
    )
    runtime_dir: Path = _opt(
        "per-sandbox socket directories and the podman socket the controller starts",
        Path,
        default_factory=_default_runtime_dir,
    )
    podman_socket: Path | None = _opt(
        "podman API socket to use; when unset the controller starts and supervises its own "
        "`podman system service` on RUNTIME_DIR/podman.sock",
        Path,
        default=None,
    )
    podman_binary: str = _opt("podman executable for the service it starts", default="podman")
    runsc_binary: str = _opt(
        "gVisor's runsc: when it is installed, sandboxes may ask for runtime GVISOR (the "
        "controller starts a second podman service whose containers all run under it)",
        default="runsc",
    )
    default_runtime: str = _opt(
        "runtime of a sandbox that names none: runc or gvisor", default="runc"
    )
    image_repository: str = _opt(
        "sandbox images are IMAGE_REPOSITORY:PROFILE", default="localhost/petri-sandbox"
    )
    default_image_profile: str = _opt("image profile of a sandbox that names none", default="full")
    default_ttl: timedelta = _opt(
        "time to live of a sandbox that sets none", parse_duration, default=timedelta(hours=1)
    )
    max_ttl: timedelta = _opt(
        "longest time to live a sandbox may have", parse_duration, default=timedelta(days=14)
    )
    default_timeout: timedelta = _opt(
        "execution timeout when a call sets none", parse_duration, default=timedelta(seconds=300)
    )
    max_timeout: timedelta = _opt(
        "longest execution timeout a call may ask for", parse_duration, default=timedelta(hours=1)
    )
    reap_interval: timedelta = _opt(
        "how often expired sandboxes are looked for: the most a deletion lags its expire_time",
        parse_duration,
        default=timedelta(seconds=1),
    )
    container_check_interval: timedelta = _opt(
        "how often every sandbox's container is checked for having died underneath the "
        "service: a safety net, as podman's event stream tells of such a container at once",
        parse_duration,
        default=timedelta(seconds=60),
    )
    tombstone_retention: timedelta = _opt(
        "how long Get still says when a deleted or expired sandbox went away",
        parse_duration,
        default=timedelta(days=7),
    )
    kill_grace: timedelta = _opt(
        "after interrupting code at its timeout, how long before the interpreter is killed",
        parse_duration,
        default=timedelta(seconds=3),
    )
    executor_slack: timedelta = _opt(
        "beyond an execution's timeout and kill grace, how long its executor may keep the "
        "controller waiting (for input files, for events) before the sandbox is marked "
        "TERMINATED as stuck",
        parse_duration,
        default=timedelta(seconds=30),
    )
    start_timeout: timedelta = _opt(
        "how long a new sandbox may take to become ready",
        parse_duration,
        default=timedelta(seconds=30),
    )
    workspace_size: int = _opt(
        "size of a sandbox's /workspace (tmpfs), default and maximum", parse_size, default=1 << 30
    )
    tmp_size: int = _opt("size of a sandbox's /tmp (tmpfs)", parse_size, default=256 << 20)
    open_files: int = _opt("open files per sandbox (RLIMIT_NOFILE)", int, default=1024)
    default_memory: int = _opt(
        "memory of a sandbox that asks for none: the memory cgroup where the host delegates "
        "it, else the address space of each process of user code (RLIMIT_AS)",
        parse_size,
        default=8 << 30,
    )
    max_memory: int = _opt("most memory a sandbox may ask for", parse_size, default=16 << 30)
    min_memory: int = _opt(
        "least memory a sandbox may ask for: what Python with the preloaded modules needs "
        "(importing numpy, pandas and matplotlib takes about 256 MiB of address space under "
        "RLIMIT_AS, less under a memory cgroup)",
        parse_size,
        default=256 << 20,
    )
    default_max_processes: int = _opt(
        "processes and threads per sandbox when it asks for no number (RLIMIT_NPROC)",
        int,
        default=512,
    )
    max_processes: int = _opt("most processes and threads a sandbox may ask for", int, default=4096)
    userns_size: int = _opt(
        "uids in the sandboxes' user namespace (container uid 0 on the service user's first "
        "subordinate id; the same for all, so they share one ID-mapped copy of each image); "
        "user code in each sandbox runs as a uid of this range that no other sandbox has. "
        "The service user needs this many subordinate uids and gids; sandbox-image/build.sh "
        "prepares the images for it (PETRI_USERNS_SIZE)",
        int,
        default=65536,
    )
    max_output_bytes: int = _opt(
        "cap on stdout and on stderr of one execution", parse_size, default=10 << 20
    )
    max_input_bytes: int = _opt(
        "input files of one execution, in total", parse_size, default=100 << 20
    )
    max_output_file_bytes: int = _opt(
        "files returned by one execution, in total", parse_size, default=100 << 20
    )
    max_output_files: int = _opt("files returned by one execution", int, default=1000)
    max_message_bytes: int = _opt(
        "largest gRPC message accepted or sent (unary calls carry whole files)",
        parse_size,
        default=192 << 20,
    )
    max_code_bytes: int = _opt("largest code of one execution", parse_size, default=10 << 20)
    max_concurrent_receives: int = _opt(
        "request messages read at once, server-wide (each up to max_input_bytes + "
        "max_code_bytes + 1 MiB): other calls wait their turn, holding no memory meanwhile",
        int,
        default=4,
    )
    max_concurrent_receives_per_caller: int = _opt(
        "request messages read at once for one caller (one token; without tokens only the "
        "server-wide limit applies)",
        int,
        default=2,
    )
    max_request_bytes_in_flight: int = _opt(
        "request data held by the calls in progress, server-wide: a call whose request would "
        "exceed it is refused RESOURCE_EXHAUSTED before anything runs",
        parse_size,
        default=512 << 20,
    )
    max_request_bytes_in_flight_per_caller: int = _opt(
        "request data held by the calls in progress of one caller: by default one unary "
        "ExecuteCode of the largest size at a time (StreamExecuteCode holds one chunk at a time); "
        "without tokens only the server-wide limit applies",
        parse_size,
        default=128 << 20,
    )
    tokens_file: Path | None = _opt(
        "TOML file of bearer tokens and the projects each may use (see controller/api/auth.py); "
        "when unset, authentication is off, which is allowed on loopback only unless "
        "--insecure-no-auth",
        Path,
        default=None,
    )
    insecure_no_auth: bool = _opt(
        "serve without authentication on a non-loopback address (development only)",
        _parse_bool,
        default=False,
    )
    tls_cert: Path | None = _opt("PEM certificate chain: serve TLS", Path, default=None)
    tls_key: Path | None = _opt("PEM private key of tls_cert", Path, default=None)
    tls_client_ca: Path | None = _opt(
        "PEM CA bundle: require client certificates signed by it (mutual TLS)",
        Path,
        default=None,
    )
    node_tls_ca: Path | None = _opt(
        "PEM CA bundle (role gateway, and role node moving sandboxes off itself): reach the "
        "nodes over TLS, verifying their certificates by it; when unset, channels to nodes "
        "are plaintext",
        Path,
        default=None,
    )
    node_tls_cert: Path | None = _opt(
        "PEM certificate chain the gateway (or node) shows nodes that require client certificates "
        "(their tls_client_ca); needs node_tls_ca",
        Path,
        default=None,
    )
    node_tls_key: Path | None = _opt("PEM private key of node_tls_cert", Path, default=None)
    node_tls_name: str = _opt(
        "the name the nodes' certificates must carry (roles gateway, node), for certificates that "
        "name a service rather than each node's address; default: the address's host",
        default="",
    )
    preload: tuple[str, ...] = _opt(
        "modules every sandbox's interpreter imports before its first execution (and after "
        "a crash), comma-separated; empty for none. Modules an image lacks are skipped",
        _parse_modules,
        default=("numpy", "pandas", "matplotlib.pyplot"),
    )
    gvisor_preload: tuple[str, ...] = _opt(
        "--preload for gVisor sandboxes, default none: under gVisor, forking an interpreter "
        "that holds pandas is slow enough that a fork bomb wedges the sandbox",
        _parse_modules,
        default=(),
    )
    warm_pool: tuple[PoolTarget, ...] = _opt(
        "sandboxes kept started and preloaded for CreateSandbox to claim, per kind: entries "
        "separated by ';', each 'size=N' (a fixed size) or 'min=N' (a size that follows "
        "recent demand, never below N; 'max=M' caps it) plus the spec a create must match: "
        "profile=, runtime=, memory=, disk=, processes=, cpu= (unset: the server's defaults). "
        "Empty for no pool",
        parse_pool,
        default=(PoolTarget(size=2, learns=True),),
    )
    warm_pool_max: int = _opt(
        "most warm pool members in all, ready or starting, for the kinds that learn to grow "
        "into: they share what the configured sizes and minimums (always kept) leave",
        int,
        default=24,
    )
    min_free_memory: int = _opt(
        "the warm pool starts no member beyond its kinds' configured sizes and minimums "
        "while the host's available memory (MemAvailable) is below this",
        parse_size,
        default=2 << 30,
    )
    max_sandboxes_per_project: int = _opt("live sandboxes per project", int, default=100)
    max_executes_per_minute: int = _opt("executions per project per minute", int, default=1200)
    max_concurrent_creates: int = _opt(
        "containers started at once, server-wide (creates, resumes, warm pool refills); "
        "more wait their turn, first come first served within a project, the projects taking "
        "turns, within each caller's deadline",
        int,
        default=16,
    )
    checkpoint_dir: Path | None = _opt(
        "where paused and idle sandboxes are saved, one file each (default "
        "STATE_DIR/checkpoints): it needs room for each sandbox's namespace and files, and "
        "is this controller's own (a file of no sandbox of its goes at its start)",
        Path,
        default=None,
    )
    default_auto_pause_after: timedelta = _opt(
        "pause a sandbox that sets no auto_pause_after once it has run no code for this long "
        "(0s: never)",
        parse_duration,
        default=timedelta(minutes=15),
    )
    max_auto_pause_after: timedelta = _opt(
        "longest auto_pause_after a sandbox may ask for (0s, never, is always allowed)",
        parse_duration,
        default=timedelta(days=14),
    )
    checkpoint_idle_after: timedelta = _opt(
        "save a running sandbox once it has run no code for this long (and again after its "
        "next executions), so that one whose container is lost comes back from it (0s: never)",
        parse_duration,
        default=timedelta(seconds=30),
    )
    hibernate_interval: timedelta = _opt(
        "how often sandboxes due for an auto-pause or an idle checkpoint are looked for",
        parse_duration,
        default=timedelta(seconds=5),
    )
    max_namespace_bytes: int = _opt(
        "most bytes of serialised globals a checkpoint keeps per sandbox; globals beyond are "
        "listed as lost. A checkpoint holds this plus the sandbox's files (its disk size)",
        parse_size,
        default=4 << 30,
    )
    checkpoint_timeout: timedelta = _opt(
        "how long saving or restoring one sandbox may take",
        parse_duration,
        default=timedelta(minutes=5),
    )
    keep_running_on_shutdown: bool = _opt(
        "leave the running sandboxes running when the controller stops, for the next one to "
        "adopt, instead of pausing them (a pause survives a reboot; a running sandbox does "
        "not)",
        _parse_bool,
        default=False,
    )
    shutdown_pause_timeout: timedelta = _opt(
        "at shutdown, how long pausing the running sandboxes may take in all; those not "
        "paused by then stay running, for the next controller to adopt",
        parse_duration,
        default=timedelta(minutes=2),
    )
    metrics_listen: str = _opt(
        "HOST:PORT to serve Prometheus metrics on, over plain HTTP at /metrics (docs/metrics.md); "
        "empty (the default) for none. It has no authentication: keep it on loopback or behind "
        "a proxy that has",
        _parse_listen_or_off,
        default="",
    )
    otel_tracing: bool = _opt(
        "trace gRPC calls with OpenTelemetry, exported as the standard OTEL_* environment "
        "variables say (needs `pip install .[otel]`)",
        _parse_bool,
        default=False,
    )
    log_format: str = _opt("console or json", default="console")
    log_level: str = _opt("debug, info, warning or error", default="info")

    @property
    def max_request_message_bytes(self) -> int:
        """The largest request the API needs: a unary ExecuteCode's input files and code."""
        return self.max_input_bytes + self.max_code_bytes + (1 << 20)

    @property
    def database_path(self) -> Path:
        return self.database or self.state_dir / "petri.db"

    @property
    def advertised_address(self) -> str:
        """Where gateways reach this node: node_address, else the listen address."""
        return self.node_address or self.listen

    @property
    def shared(self) -> bool:
        """Whether this process is one of several on one registry (role node or gateway)."""
        return self.role != "single"

    @property
    def checkpoint_path(self) -> Path:
        return self.checkpoint_dir or self.state_dir / "checkpoints"

    def image_for(self, profile: str) -> str:
        return f"{self.image_repository}:{profile}"

    def describe(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, timedelta):
                out[f.name] = format_duration(value)
            elif f.name == "database_url":
                out[f.name] = redact_url(value)
            elif isinstance(value, tuple):
                out[f.name] = (";" if f.name == "warm_pool" else ",").join(map(str, value))
            else:
                out[f.name] = str(value)
        return out


def _env_name(field_name: str) -> str:
    return "PETRI_" + field_name.upper()


def _flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m controller",
        description="petri's controller: the gRPC API for isolated, stateful code sandboxes.",
    )
    for f in fields(Config):
        help_text = f"{f.metadata['help']} (env {_env_name(f.name)})"
        if f.metadata["parse"] is _parse_bool:  # a switch: present means true
            parser.add_argument(
                _flag_name(f.name), dest=f.name, action="store_const", const="true", help=help_text
            )
        else:
            parser.add_argument(
                _flag_name(f.name), dest=f.name, metavar=f.name.upper(), help=help_text
            )
    return parser


def load_config(argv: Sequence[str] | None = None, environ: dict[str, str] | None = None) -> Config:
    """Builds the config from flags, then PETRI_* variables, then defaults.

    Raises SystemExit with a usage message when a value does not parse.
    """
    environ = dict(os.environ) if environ is None else environ
    parser = build_parser()
    args = parser.parse_args(argv)
    values: dict[str, Any] = {}
    for f in fields(Config):
        raw = getattr(args, f.name)
        source = _flag_name(f.name)
        if raw is None:
            raw = environ.get(_env_name(f.name))
            source = _env_name(f.name)
        if raw is None:
            continue
        try:
            values[f.name] = f.metadata["parse"](raw)
        except ValueError as exc:
            parser.error(f"{source}: {exc}")
    config = replace(Config(), **values)
    problems = validate(config)
    if problems:
        parser.error("; ".join(problems))
    return config


def validate(config: Config) -> list[str]:
    problems = []
    if config.shared and not config.database_url.startswith(("postgresql://", "postgres://")):
        problems.append(
            f"role {config.role} needs the shared registry in PostgreSQL: set --database-url "
            "(PETRI_DATABASE_URL) to a postgresql:// URL"
        )
    for name in ("heartbeat_interval", "node_timeout", "node_keepalive"):
        if getattr(config, name) <= timedelta(0):
            problems.append(f"{name} must be positive")
    if config.node_timeout <= config.heartbeat_interval:
        problems.append("node_timeout must exceed heartbeat_interval (a live node would look dead)")
    if config.max_sandboxes_per_node < 0:
        problems.append("max_sandboxes_per_node must not be negative")
    if config.max_ttl > timedelta(days=14):
        problems.append("max_ttl may be at most 14d")
    if not timedelta(0) < config.default_ttl <= config.max_ttl:
        problems.append("default_ttl must be positive and at most max_ttl")
    if not timedelta(0) < config.default_timeout <= config.max_timeout:
        problems.append("default_timeout must be positive and at most max_timeout")
    if not timedelta(0) <= config.default_auto_pause_after <= config.max_auto_pause_after:
        problems.append("default_auto_pause_after must be between 0s and max_auto_pause_after")
    for name in ("checkpoint_idle_after", "shutdown_pause_timeout"):
        if getattr(config, name) < timedelta(0):
            problems.append(f"{name} must not be negative")
    for name in ("hibernate_interval", "checkpoint_timeout"):
        if getattr(config, name) <= timedelta(0):
            problems.append(f"{name} must be positive")
    if config.max_namespace_bytes <= 0:
        problems.append("max_namespace_bytes must be positive")
    if config.executor_slack <= timedelta(0):
        problems.append("executor_slack must be positive")
    if (config.tls_cert is None) != (config.tls_key is None):
        problems.append("tls_cert and tls_key go together")
    if config.tls_client_ca is not None and config.tls_cert is None:
        problems.append("tls_client_ca (mutual TLS) needs tls_cert and tls_key")
    if (config.node_tls_cert is None) != (config.node_tls_key is None):
        problems.append("node_tls_cert and node_tls_key go together")
    if config.node_tls_ca is None and (config.node_tls_cert or config.node_tls_name):
        problems.append("node_tls_cert and node_tls_name need node_tls_ca (TLS to the nodes)")
    if config.userns_size <= WORKER_UID_FIRST:
        problems.append(
            f"userns_size must exceed {WORKER_UID_FIRST} (user code's uids start there)"
        )
    if not config.min_memory <= config.default_memory <= config.max_memory:
        problems.append("default_memory must be between min_memory and max_memory")
    if config.warm_pool_max < 0:
        problems.append("warm_pool_max must not be negative")
    if config.min_free_memory < 0:
        problems.append("min_free_memory must not be negative")
    if config.max_concurrent_creates < 1:
        problems.append("max_concurrent_creates must be at least 1")
    if config.default_runtime not in ("runc", "gvisor"):
        problems.append("default_runtime must be runc or gvisor")
    if config.log_format not in ("console", "json"):
        problems.append("log_format must be console or json")
    # A unary response carries the files, stdout, stderr and rich outputs; a request the
    # input files and the code. Both must fit in one message.
    response = config.max_output_file_bytes + 3 * config.max_output_bytes + (1 << 20)
    request = config.max_request_message_bytes
    if config.max_message_bytes < max(response, request):
        problems.append(
            f"max_message_bytes must be at least {max(response, request)} for these limits "
            "(max_output_file_bytes + 3 * max_output_bytes, max_input_bytes + max_code_bytes, "
            "plus 1 MiB)"
        )
    if not 1 <= config.max_concurrent_receives_per_caller <= config.max_concurrent_receives:
        problems.append(
            "max_concurrent_receives_per_caller must be at least 1 and at most "
            "max_concurrent_receives"
        )
    if not (
        request
        <= config.max_request_bytes_in_flight_per_caller
        <= config.max_request_bytes_in_flight
    ):
        problems.append(
            f"max_request_bytes_in_flight_per_caller must be at least {request} (the largest "
            "request: max_input_bytes + max_code_bytes + 1 MiB) and at most "
            "max_request_bytes_in_flight"
        )
    return problems
