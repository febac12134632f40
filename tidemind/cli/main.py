"""`tidemind` command line: one sub-command per verb, each in its own module."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import List, Optional

from . import bench, chat, convert, evaluation, info, lite, serve


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tidemind", description="Compress, deploy and serve large language models.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    for module in (chat, serve, lite, convert, evaluation, bench, info):
        module.add_commands(commands)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args, extra_args = parser.parse_known_args(argv)
    takes_extra_args = getattr(args, "takes_extra_args", False)
    if extra_args and not takes_extra_args:  # answered with the verb's own usage
        getattr(args, "verb_parser", parser).error(f"unrecognized arguments: {' '.join(extra_args)}")
    logging.basicConfig(level=getattr(args, "log_level", "WARNING"), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return (args.handler(args, extra_args) if takes_extra_args else args.handler(args)) or 0
    except (ValueError, OSError, RuntimeError) as exc:
        # Errors the user can cause carry a message naming the fix: show it without a traceback.
        if logging.getLogger("tidemind").isEnabledFor(logging.DEBUG):
            raise
        print(f"tidemind: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
