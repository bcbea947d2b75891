"""`petri`: the command line of the petri service, on the SDK (petri.Sandbox, petri.Client).

Every command takes the connection options (else the PETRI_* environment, as the SDK) and
`--json`. A failure is one line `petri: error: ...` on stderr and an exit code per class of
failure (petri.cli.errors.Exit, docs/cli.md)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from petri import Client, PetriError
from petri.cli.errors import CliError, Exit, describe, exit_code_of, report

_EPILOG = """exit codes: 0 ok, 1 the code raised, 2 usage, 3 not found, 4 already exists,
5 invalid argument, 6 failed precondition, 7 resource exhausted or quota, 8 auth,
9 unavailable, 10 other server error, 11 local file error, 124 the code timed out,
130 interrupted or cancelled, 137 the interpreter died"""


def _connection_options(suppress: bool) -> argparse.ArgumentParser:
    """The options every command takes, before or after its name. After it (`suppress`), an
    option not given leaves the value from before it alone."""
    default = argparse.SUPPRESS if suppress else None
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("connection (default: the PETRI_* environment)")
    group.add_argument("--addr", default=default, help="host:port of the service (PETRI_ADDR)")
    group.add_argument("--token", default=default, help="bearer token (PETRI_TOKEN)")
    group.add_argument("--project", default=default, help="project (PETRI_PROJECT: default)")
    group.add_argument(
        "--tls-ca", default=default, metavar="FILE", help="CA bundle (PETRI_TLS_CA): TLS"
    )
    group.add_argument("--tls-cert", default=default, metavar="FILE", help="(PETRI_TLS_CERT)")
    group.add_argument("--tls-key", default=default, metavar="FILE", help="(PETRI_TLS_KEY)")
    common.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS if suppress else False,
        help="print one JSON document",
    )
    return common


def build_parser() -> argparse.ArgumentParser:
    from petri.cli import commands  # rich (the cli extra): not needed by `petri mcp`

    common = _connection_options(suppress=True)
    parser = argparse.ArgumentParser(
        prog="petri",
        parents=[_connection_options(suppress=False)],
        description="Isolated, stateful Python sandboxes for AI agents.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str, run: Callable[..., int]) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common], help=help_text, description=help_text)
        p.set_defaults(run=run)
        return p

    p = command("create", "create a sandbox and print it", commands.create)
    p.add_argument("--id", dest="sandbox_id", help="the sandbox's id ([a-z][a-z0-9-]{0,62})")
    p.add_argument("--profile", help="image profile, e.g. test or full (petri profiles)")
    p.add_argument("--runtime", choices=["runc", "gvisor"], help="container runtime")
    p.add_argument("--ttl", help="time to live: 90s, 30m, 2h, 1d (server default)")
    p.add_argument("--label", "-l", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--display-name")
    p.add_argument("--auto-pause-after", metavar="DURATION", help="pause after idling this long")
    p.add_argument("--cpus", type=float, help="CPU cores, e.g. 0.5")
    p.add_argument("--memory", help="memory, e.g. 512M")
    p.add_argument("--disk", help="size of /workspace, e.g. 1G")
    p.add_argument("--pids", type=int, help="processes and threads")

    p = command("ls", "list sandboxes", commands.ls)
    p.add_argument("--filter", "-f", default="", help='e.g. state = RUNNING AND labels.team = "ml"')
    p.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    p.add_argument("--all", "-a", action="store_true", help="every page, no limit")

    p = command("get", "show a sandbox", commands.get)
    p.add_argument("name", help="a sandbox: my-box or projects/p/sandboxes/my-box")

    p = command("exec", "run Python code in a sandbox", commands.exec_)
    p.add_argument("name")
    p.add_argument("code", nargs="?", help="the code; '-' or none with -f: see below")
    p.add_argument("-f", "--file", help="read the code from this file ('-': stdin)")
    p.add_argument("--timeout", help="interrupt the code after this long, e.g. 30s")
    p.add_argument("--save-outputs", metavar="DIR", help="write rich outputs and output files here")

    p = command("cp", "copy a file into or out of a sandbox", commands.cp)
    p.add_argument("source", help="./local or NAME:path ('-': stdin)")
    p.add_argument("dest", help="NAME:path or ./local ('-': stdout)")

    for name, run, text in (
        ("pause", commands.pause, "save a sandbox to disk and stop it"),
        ("resume", commands.resume, "bring a paused sandbox back"),
    ):
        command(name, text, run).add_argument("name")

    p = command("rm", "delete sandboxes", commands.rm)
    p.add_argument("names", nargs="+", metavar="name")
    p.add_argument("--missing-ok", action="store_true", help="succeed when one does not exist")

    command("profiles", "list the image profiles", commands.profiles)
    # Only for --help: petri.cli.main hands `petri mcp ...` to petri.mcp before this parser.
    sub.add_parser("mcp", help="run the MCP server (petri mcp --help)", add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, extra = parser.parse_known_args(args_list)
    # argparse takes `exec NAME --timeout 1s CODE`'s optional CODE as absent at the option.
    if args.command == "exec" and args.code is None and len(extra) == 1:
        args.code, extra = extra[0], []
    if extra:
        parser.error("unrecognized arguments: " + " ".join(extra)[:200])
    try:
        with Client(
            addr=args.addr,
            token=args.token,
            project=args.project,
            tls_ca=args.tls_ca,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
        ) as client:
            code: int = args.run(client, args)
            return code
    except PetriError as error:
        report(describe(error))
        return exit_code_of(error)
    except CliError as error:
        report(str(error))
        return error.code
    except BrokenPipeError:
        # The reader went away (`petri exec ... | head`): the run was cancelled on the way out;
        # exit as a tool killed by SIGPIPE, without a word, and without a last flush failing.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return Exit.BROKEN_PIPE
    except OSError as error:
        report(f"{error.filename or ''}: {error.strerror or error}".lstrip(": "))
        return Exit.LOCAL_IO
    except KeyboardInterrupt:
        report("interrupted")
        return Exit.INTERRUPTED
