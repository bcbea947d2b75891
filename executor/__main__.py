"""Entry point: `python -m executor --socket /run/petri/executor.sock`."""

import argparse
import asyncio
import logging
import os
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description="petri's executor daemon (runs in a sandbox)")
    parser.add_argument("--socket", type=Path, required=True, help="unix socket to serve on")
    parser.add_argument(
        "--workspace", type=Path, default=Path("/workspace"), help="the code's working directory"
    )
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # The daemon forks to start its worker and tar (as user code's uid, so not by vfork):
    # gRPC's fork handlers then run in the child and may abort it ("Check failed:
    # next_worker->state == KICKED"), although the child only execs. The child never uses
    # gRPC: turn them off, before gRPC is imported.
    os.environ["GRPC_ENABLE_FORK_SUPPORT"] = "0"
    from executor import daemon

    asyncio.run(daemon.run(args.socket, args.workspace))


if __name__ == "__main__":
    main()
