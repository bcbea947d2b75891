"""Entry point: `python -m controller [flags]`; every flag has a PETRI_* variable."""

import asyncio
import sys

from controller.config import load_config
from controller.errors import PetriError
from controller.log_setup import configure


def main() -> None:
    config = load_config()
    configure(config.log_format, config.log_level)
    from controller.app import serve

    try:
        asyncio.run(serve(config))
    except (PetriError, ValueError, OSError) as exc:
        print(f"petri controller: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
